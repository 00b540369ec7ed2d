"""The radix selection's bookkeeping on numpy histogram tables, without torch: the k-th bins of
the level-0 histograms, the level-1 pass over the bins that need it, the thresholds and the L1
each keeps. selection.py runs it over a torch backend's histograms and CoreKernels
(pipeline/core_kernels.py) over fastmerge._core's, so both give the same floats.

Level 0 bins the top 16 bits of each score (its float32 pattern), level 1 the low 16 bits of
the elements in the bin of the k-th largest. ``uniform_bins``: where the level-0 sums are
exact (the CPU kernel's, csrc/cpu/histogram.cpp: per-bin sums of |t| rebuilt exactly from the
count and the sum of the low bits) a bin whose sum is count * (its lowest value) holds that
one value only, so its k-th largest is known without the level-1 pass; bf16 task vectors
often have no low bits at all, and a selection whose every k-th bin is such a bin reads its
inputs once instead of twice.

``radix_select_one_read`` (CoreKernels and backend "cpu", a tensor of several chunks) reads
each chunk once: the first chunk's level 0 points at the bins likely to hold each k-th
largest, and their level-1 histograms are gathered with level 0 from then on; only a request
whose bin was missed costs a second read. The extra rows cost some CPU where the inputs sit
in the page cache, and save a whole read of the tensor where they do not (a merge under a
small budget).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..abi import NONFINITE_BIN, NUM_BINS, RADIX_BITS
from .thresholds import Selection, bits_to_floats, nonfinite_error, unselected

# counts below this keep count * value exact in float64 (a 24-bit significand times < 2^29)
EXACT_COUNT = 1 << 29


@dataclass
class HistTables:
    """Level-0 histograms (per model) of one selection as numpy tables, mergeable by ``add``."""
    counts: np.ndarray  # int64 [N, NUM_BINS]
    sums: np.ndarray    # float64 [N, NUM_BINS]

    @classmethod
    def zeros(cls, rows: int) -> "HistTables":
        return cls(np.zeros((rows, NUM_BINS), dtype=np.int64),
                   np.zeros((rows, NUM_BINS), dtype=np.float64))

    def add(self, other: "HistTables") -> "HistTables":
        self.counts += other.counts
        self.sums += other.sums
        return self

    @property
    def numel(self) -> int:
        return int(self.counts[0].sum())

    def total_l1(self) -> list[float]:
        return self.sums.sum(1).tolist()


def check_finite(counts: np.ndarray, names: Sequence[str]) -> None:
    """Raises nonfinite_error for the first model whose level-0 histogram holds NaN/Inf."""
    bad = counts[:, NONFINITE_BIN:].sum(1).tolist()
    for i, b in enumerate(bad):
        if b:
            raise nonfinite_error(i, b, names)


def kth_bins(counts: np.ndarray, ks: np.ndarray, above: np.ndarray):
    """For each row, the bin holding its k-th largest element (bins ordered high to low) and
    the count strictly above that bin. counts: int64 [R, NUM_BINS]; ks, above: int64 [R]."""
    desc = np.cumsum(counts[:, ::-1], axis=1)   # desc[r, j]: count in bins >= NUM_BINS-1-j
    desc += above[:, None]
    pos = (desc < ks[:, None]).sum(1)           # first j with desc >= k (desc is sorted)
    prev = np.where(pos > 0, desc[np.arange(len(pos)), np.maximum(pos - 1, 0)], above)
    return NUM_BINS - 1 - pos, prev


def uniform(counts: np.ndarray, sums: np.ndarray, rows: np.ndarray, bins: np.ndarray):
    """Whether bin bins[r] of model rows[r] holds one value only (its lowest, low bits 0),
    from exact level-0 sums: sum == count * value, the count small enough for exactness."""
    cnt = counts[rows, bins]
    value = np.array(bits_to_floats((bins << RADIX_BITS).tolist()), dtype=np.float64)
    return (cnt < EXACT_COUNT) & (sums[rows, bins] == cnt.astype(np.float64) * value)


def select_tables(hist: HistTables, requests: Sequence[tuple[int, int]],
                  level1: Callable[[np.ndarray], tuple], l1: bool = True,
                  uniform_bins: bool = False):
    """Exact T(k) for each (model, k) request (k <= 0: inf, k >= n: 0.0) from the level-0
    tables and ``level1(targets)`` (one read pass: int64 [R, 2] rows (model, prefix) ->
    (counts, sums) [R, NUM_BINS] numpy tables); ``l1=False`` leaves ``kept_l1`` None. Returns
    the Selection and the read passes made (1: level 0 decided every request)."""
    counts, sums = hist.counts, hist.sums
    thresholds, pending, kept = unselected(
        requests, hist.numel, (lambda i: float(sums[i].sum())) if l1 else None)
    if not pending:
        return Selection(thresholds, kept), 1
    rows = np.array([requests[r][0] for r in pending], dtype=np.int64)
    ks = np.array([requests[r][1] for r in pending], dtype=np.int64)
    b, above = kth_bins(counts[rows], ks, np.zeros_like(ks))
    low = np.zeros_like(b)
    # the L1 the level-1 pass would add inside the k-th bin; a uniform bin's is its whole sum
    in_bin = sums[rows, b].copy() if l1 else None
    need = ~uniform(counts, sums, rows, b) if uniform_bins else np.ones(len(rows), dtype=bool)
    passes = 1
    if need.any():
        at = np.flatnonzero(need)
        c1, s1 = level1(np.stack([rows[at], b[at]], axis=1))
        low[at], _ = kth_bins(c1, ks[at], above[at])
        if l1:
            for j, row in enumerate(at):
                in_bin[row] = float(s1[j, int(low[row]):].sum())
        passes = 2
    values = bits_to_floats(((b << RADIX_BITS) | low).tolist())
    for row, r in enumerate(pending):
        thresholds[r] = values[row]
        if l1:
            kept[r] = float(sums[int(rows[row]), int(b[row]) + 1:].sum()) + float(in_bin[row])
    return Selection(thresholds, kept), passes


def level0_tables(n_models: int, accumulate: Callable[[np.ndarray, int, HistTables], None],
                  names: Sequence[str] = ()) -> HistTables:
    """Level-0 tables of every model from ``accumulate(targets, level, tables)`` (one read
    pass adding into the tables); raises on NaN/Inf task vectors."""
    targets = np.array([[i, 0] for i in range(n_models)], dtype=np.int64)
    hist = HistTables.zeros(n_models)
    accumulate(targets, 0, hist)
    check_finite(hist.counts, names)
    return hist


def radix_select(n_models: int, requests, accumulate, names: Sequence[str] = (), l1: bool = True,
                 hist: Optional[HistTables] = None, uniform_bins: bool = False):
    """The chunked radix selection over ``accumulate`` (see level0_tables): (Selection, the
    per-model total L1 or None, the read passes made)."""
    passes = 0
    if hist is None:
        hist = level0_tables(n_models, accumulate, names)
        passes = 1

    def level1(targets):
        t = HistTables.zeros(len(targets))
        accumulate(targets, 1, t)
        return t.counts, t.sums
    sel, p = select_tables(hist, requests, level1, l1, uniform_bins)
    return sel, (hist.total_l1() if l1 else None), passes + p - 1


def guess_windows(first: HistTables, requests, pending, numel: int, width: int):
    """Level-1 rows (model, first prefix) and their widths to gather in the level-0 read: per
    pending request, the bins from where the first chunk's level 0 puts its k-th largest,
    scaled to the chunk, give or take four standard deviations of a sample of that size, at
    most ``width`` bins around the central guess."""
    n_c = first.numel
    if n_c == 0 or not pending:
        return np.zeros((0, 2), dtype=np.int64), []
    rows = np.array([requests[r][0] for r in pending], dtype=np.int64)
    kc = np.array([requests[r][1] for r in pending], dtype=np.float64) * (n_c / numel)
    sd = 4.0 * np.sqrt(kc * (1.0 - kc / n_c)) + 1.0
    counts = first.counts[rows]
    zero = np.zeros(len(rows), dtype=np.int64)

    def bins(k):
        return kth_bins(counts, np.clip(np.ceil(k), 1, n_c).astype(np.int64), zero)[0]
    mid, lo, hi = bins(kc), bins(kc + sd), bins(kc - sd)   # a larger k: a lower bin
    out = set()
    for r in range(len(rows)):
        a, b = int(lo[r]), min(int(hi[r]), NONFINITE_BIN - 1)
        if b - a + 1 > width:
            a = min(max(int(mid[r]) - width // 2, a), NONFINITE_BIN - width)
            b = a + width - 1
        out.add((int(rows[r]), a, b - a + 1))
    got = sorted(out)
    return (np.array([[m, a] for m, a, _ in got], dtype=np.int64).reshape(-1, 2),
            [w for _, _, w in got])


def radix_select_one_read(n_models: int, requests, source: Callable, hist_chunk: Callable,
                          windows_chunk: Callable, numel: int, names: Sequence[str] = (),
                          l1: bool = True, width: int = 16, max_rows: Optional[int] = None):
    """``radix_select`` that reads each chunk once where it can: with each chunk's level-0
    histograms (``hist_chunk(chunk, targets, level, tables)`` adds one chunk's into the
    tables) go the level-1 histograms of the bins the first chunk's level 0 points at
    (``guess_windows``; ``windows_chunk(chunk, rows, widths, counts, sums)`` adds them); a
    request whose k-th bin is among them needs no second read, the others get a level-1 read
    as in ``radix_select``. Exact either way. ``max_rows``: at most that many level-1 tables
    (1 MiB each) held at once: the windows get what the level-1 tables of the pending
    requests leave (none where that is less than one row per request: then two reads), and
    are dropped before a second read. Returns (Selection, per-model total L1 or None, read
    passes made)."""
    t0 = np.array([[i, 0] for i in range(n_models)], dtype=np.int64)
    pending = [r for r, (_, k) in enumerate(requests) if 0 < k < numel]
    if max_rows is not None and pending:
        width = min(width, (max_rows - len(pending)) // len(pending))
    hist = HistTables.zeros(n_models)
    rows, widths, wc, ws = None, [], None, None
    for ch in source():
        hist_chunk(ch, t0, 0, hist)
        if rows is None and width > 0:   # hist holds the first chunk's level 0 alone
            rows, widths = guess_windows(hist, requests, pending, numel, width)
            wc = np.zeros(sum(widths) * NUM_BINS, dtype=np.int64)
            ws = np.zeros(sum(widths) * NUM_BINS, dtype=np.float64)
        if widths:
            windows_chunk(ch, rows, widths, wc, ws)
        del ch
    check_finite(hist.counts, names)
    starts = np.cumsum([0] + widths[:-1]) if widths else []
    reread = []

    def table(m, p):
        """The (counts, sums) of prefix p of model m among the windows, or None."""
        for j in range(len(widths)):
            if rows[j, 0] == m and rows[j, 1] <= p < rows[j, 1] + widths[j]:
                at = (int(starts[j]) + p - int(rows[j, 1])) * NUM_BINS
                return wc[at:at + NUM_BINS], ws[at:at + NUM_BINS]
        return None

    def level1(targets):
        nonlocal wc, ws
        hit = [(j, table(m, p)) for j, (m, p) in enumerate(targets.tolist())]
        miss = [j for j, got in hit if got is None]
        if len(miss) == len(targets):   # the level-1 tables themselves, as radix_select's
            wc = ws = None
            t = HistTables.zeros(len(targets))
            for ch in source():
                hist_chunk(ch, targets, 1, t)
                del ch
            reread.append(1)
            return t.counts, t.sums
        c1 = np.zeros((len(targets), NUM_BINS), dtype=np.int64)
        s1 = np.zeros((len(targets), NUM_BINS), dtype=np.float64)
        for j, got in hit:
            if got is not None:
                c1[j], s1[j] = got
        hit = wc = ws = None   # the windows are read: dropped before a second read
        if miss:
            reread.append(1)
            t = HistTables.zeros(len(miss))
            for ch in source():
                hist_chunk(ch, targets[miss], 1, t)
                del ch
            c1[miss], s1[miss] = t.counts, t.sums
        return c1, s1
    sel, _ = select_tables(hist, requests, level1, l1, uniform_bins=True)
    return sel, (hist.total_l1() if l1 else None), 2 if reread else 1
