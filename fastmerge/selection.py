"""Exact k-th largest scores by two-level radix (histogram) selection, chunk by chunk.

The score of an element (|t| or t*t*v, float32, non-negative) orders like its 31-bit pattern.
Level 0 histograms the top 16 bits over every chunk; the bin holding the k-th largest is found
from the descending cumulative counts; level 1 histograms the low 16 bits of the elements in
that bin, which pins the exact float32 value. Histograms add across chunks, tensors and ranks,
so the threshold of a chunked tensor (or of a whole model, ``scope="model"``) is exactly the
one a full sort would give. Cost: one read pass per level (level 1 only when 0 < k < n).

Per-bin sums of |t| ride along, so the L1 norm of what a threshold keeps (``rescale="l1"``)
comes from the same passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from .ops import NONFINITE_BIN, NUM_BINS, RADIX_BITS


@dataclass
class Chunk:
    """A piece of one tensor (or of a model-wide stream): base, N models, N second moments
    (or empty), and the global index of its first element (DARE counters)."""
    base: Optional[torch.Tensor]
    models: Sequence[torch.Tensor]
    second_moments: Sequence[torch.Tensor] = ()
    offset: int = 0
    name: str = ""


ChunkSource = Callable[[], Iterable[Chunk]]  # called once per pass


@dataclass
class Histograms:
    """Level-0 histograms (per model) of one selection, mergeable by ``add``."""
    counts: torch.Tensor  # int64 [N, 65536]
    sums: torch.Tensor    # float64 [N, 65536]

    def add(self, other: "Histograms") -> "Histograms":
        self.counts += other.counts
        self.sums += other.sums
        return self

    @property
    def numel(self) -> int:
        return int(self.counts[0].sum())

    def total_l1(self) -> list[float]:
        return self.sums.sum(1).tolist()


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def accumulate(backend, source: ChunkSource, score: int, targets: torch.Tensor, level: int,
               reduce: Optional[Callable] = None):
    """One read pass: the level's histograms of every target, summed over the chunks (and,
    through ``reduce(counts, sums)``, over ranks)."""
    counts = sums = None
    for chunk in source():
        c, s = backend.histogram(chunk, score, targets, level)
        if counts is None:  # the first chunk's buffers become the accumulators
            counts, sums = c, s
        else:
            counts += c
            sums += s
    if counts is None:  # a rank (or source) with no chunks contributes zeros
        counts = torch.zeros(targets.shape[0], NUM_BINS, dtype=torch.int64)
        sums = torch.zeros(targets.shape[0], NUM_BINS, dtype=torch.float64)
    if reduce is not None:
        reduce(counts, sums)
    return counts, sums


def level0(backend, n_models: int, score: int, source: ChunkSource,
           names: Sequence[str] = (), reduce: Optional[Callable] = None) -> Histograms:
    """``reduce(counts, sums)``, if given, sums the histograms over ranks in place (a source
    split over ranks, fastmerge/engine/parallel.py)."""
    targets = torch.tensor([[i, 0] for i in range(n_models)], dtype=torch.int64)
    counts, sums = accumulate(backend, source, score, targets, 0, reduce)
    bad = counts[:, NONFINITE_BIN:].sum(1)
    for i in range(n_models):
        if bad[i]:
            what = f"tensor {names[0]!r}" if len(names) == 1 else "the tensors merged"
            raise ValueError(f"task vector of model {i} for {what} contains {int(bad[i])} "
                             f"NaN/Inf value(s); fastmerge refuses to merge them")
    return Histograms(counts, sums)


@dataclass
class Selection:
    """k-th largest score for each request (model, k), and what the threshold keeps."""
    thresholds: list[float]
    kept_l1: list[float]


def select(backend, hist: Histograms, requests: Sequence[tuple[int, int]], score: int,
           source: ChunkSource, reduce: Optional[Callable] = None) -> Selection:
    """Exact T(k) for each (model, k) request; k <= 0 gives inf, k >= n gives 0.0."""
    n = hist.numel
    thresholds: list[Optional[float]] = [None] * len(requests)
    kept = [0.0] * len(requests)
    pending = []  # (request index, model, prefix bin, count above the bin, k)
    for r, (i, k) in enumerate(requests):
        if k <= 0:
            thresholds[r], kept[r] = float("inf"), 0.0
        elif k >= n:
            thresholds[r], kept[r] = 0.0, float(hist.sums[i].sum())
        else:
            desc = torch.flip(hist.counts[i], [0]).cumsum(0)       # count of bins >= b
            pos = int(torch.searchsorted(desc, torch.tensor(k)))    # first position with >= k
            b = NUM_BINS - 1 - pos
            above = int(desc[pos - 1]) if pos > 0 else 0
            kept[r] = float(hist.sums[i, b + 1:].sum())
            pending.append((r, i, b, above, k))
    if pending:
        targets = torch.tensor([[i, b] for _, i, b, _, _ in pending], dtype=torch.int64)
        counts, sums = accumulate(backend, source, score, targets, 1, reduce)
        for row, (r, i, b, above, k) in enumerate(pending):
            desc = torch.flip(counts[row], [0]).cumsum(0) + above
            pos = int(torch.searchsorted(desc, torch.tensor(k)))
            low = NUM_BINS - 1 - pos
            thresholds[r] = _bits_to_float((b << RADIX_BITS) | low)
            kept[r] += float(sums[row, low:].sum())
    return Selection([float(t) for t in thresholds], kept)
