"""Exact k-th largest scores by two-level radix (histogram) selection, chunk by chunk.

The score of an element (|t| or t*t*v, float32, non-negative) orders like its 31-bit pattern.
Level 0 histograms the top 16 bits over every chunk; the bin holding the k-th largest is found
from the descending cumulative counts; level 1 histograms the low 16 bits of the elements in
that bin, which pins the exact float32 value. Histograms add across chunks, tensors and ranks,
so the threshold of a chunked tensor (or of a whole model, ``scope="model"``) is exactly the
one a full sort would give. Cost: one read pass per level (level 1 only when 0 < k < n).

Per-bin sums of |t| ride along, so the L1 norm of what a threshold keeps (``rescale="l1"``)
comes from the same passes.

``select_one_pass`` is the fast path for a magnitude top-k of one tensor held in one chunk,
where the backend has the ``topk_window`` kernel (the CPU backend): one read pass over a
window of score values chosen from a sample, exact where it decides; when a window misses,
the caller falls back to the radix selection.

``select_one_read`` is the radix selection of a magnitude score over several chunks (or after a
window miss) where the backend bins several level-1 prefixes at once
(``score_histogram_windows``, the CPU backend): radix.py's ``radix_select_one_read``, the
algorithm the torch-free CoreKernels run, fed by the backend's histogram ops, so the level-1
bins the first chunk points at are gathered in the level-0 read.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from ..abi import NONFINITE_BIN, NUM_BINS, SCORE_MAGNITUDE
from .radix import HistTables, radix_select_one_read, select_tables
from .thresholds import Selection, bits_to_floats, nonfinite_error, one_pass, unselected  # noqa: F401


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
    """Level-0 histograms (per model) of one selection, mergeable by ``add``. On the CPU."""
    counts: torch.Tensor  # int64 [N, 65536]
    sums: torch.Tensor    # float64 [N, 65536]

    def add(self, other: "Histograms") -> "Histograms":
        self.counts += other.counts
        self.sums += other.sums
        return self

    @property
    def numel(self) -> int:
        return int(self.counts[0].numpy().sum())

    def total_l1(self) -> list[float]:
        return self.tables().total_l1()

    def tables(self) -> HistTables:
        """The same tables as numpy arrays (shared memory)."""
        return HistTables(self.counts.numpy(), self.sums.numpy())


# The selection bookkeeping below runs once per tensor on [rows, 65536] tables. It used torch
# ops (zeros, flip, sum per request); those big enough to go parallel (>= 32768 elements)
# each waited on an OpenMP worker, which on this loaded 2-core VM, with the read thread
# busy, cost ~1-2 ms per op: 2.7 of a 5.0 s cProfiled ties merge (0.2B preset, 111 tensors).
# Now: buffers reused (numpy memset), integer work in numpy (single-threaded, exact), and
# the float64 L1 sums (the same torch ops as before, bit-identical) only when a caller asks.
class _Scratch(threading.local):
    def __init__(self):
        self.bufs: dict = {}


_SCRATCH = _Scratch()


def _zeroed(rows: int, device: torch.device, slot: Optional[str]):
    """Zeroed int64 counts and float64 sums [rows, NUM_BINS] on ``device``. ``slot=None``:
    fresh tensors the caller may keep; else this thread's buffers for ``slot``, valid until
    the next call with the same slot (saves the page faults of 1 MiB per row per tensor)."""
    if slot is None or device.type != "cpu":
        return (torch.zeros(rows, NUM_BINS, dtype=torch.int64, device=device),
                torch.zeros(rows, NUM_BINS, dtype=torch.float64, device=device))
    c, s = _SCRATCH.bufs.get(slot, (None, None))
    if c is None or c.shape[0] < rows:
        c = torch.from_numpy(np.zeros((rows, NUM_BINS), dtype=np.int64))
        s = torch.from_numpy(np.zeros((rows, NUM_BINS), dtype=np.float64))
        _SCRATCH.bufs[slot] = (c, s)
        return c, s
    c, s = c[:rows], s[:rows]
    c.numpy().fill(0)
    s.numpy().fill(0)
    return c, s


def release_scratch() -> None:
    """Drop this thread's reused selection buffers (1 MiB per histogram row)."""
    _SCRATCH.bufs.clear()


def accumulate(backend, source: ChunkSource, score: int, targets: torch.Tensor, level: int,
               reduce: Optional[Callable] = None, slot: Optional[str] = None):
    """One read pass: the level's histograms of every target, summed over the chunks (the
    kernels accumulate in place) and, through ``reduce(counts, sums)``, over ranks; on the
    CPU. ``slot``: reuse this thread's buffers of that name (see ``_zeroed``)."""
    counts = sums = dev_targets = None
    for chunk in source():
        if counts is None:
            dev = chunk.models[0].device
            counts, sums = _zeroed(targets.shape[0], dev, slot)
            dev_targets = targets.to(dev)
        backend.histogram_into(chunk, score, dev_targets, level, counts, sums)
    if counts is None:  # a rank (or source) with no chunks contributes zeros
        counts, sums = _zeroed(targets.shape[0], torch.device("cpu"), slot)
    counts, sums = counts.cpu(), sums.cpu()
    if reduce is not None:
        reduce(counts, sums)
    return counts, sums


def level0(backend, n_models: int, score: int, source: ChunkSource,
           names: Sequence[str] = (), reduce: Optional[Callable] = None,
           scratch: bool = False) -> Histograms:
    """``reduce(counts, sums)``, if given, sums the histograms over ranks in place (a source
    split over ranks, fastmerge/pipeline/parallel.py). ``scratch``: the result lives in a
    reused buffer, valid until this thread's next ``level0(scratch=True)`` (per-tensor
    selection); otherwise the caller owns it (e.g. adds histograms over tensors)."""
    targets = torch.tensor([[i, 0] for i in range(n_models)], dtype=torch.int64)
    counts, sums = accumulate(backend, source, score, targets, 0, reduce,
                              "level0" if scratch else None)
    bad = counts.numpy()[:, NONFINITE_BIN:].sum(1).tolist()
    for i in range(n_models):
        if bad[i]:
            raise nonfinite_error(i, bad[i], names)
    return Histograms(counts, sums)


def select(backend, hist: Histograms, requests: Sequence[tuple[int, int]], score: int,
           source: ChunkSource, reduce: Optional[Callable] = None,
           l1: bool = True) -> Selection:
    """Exact T(k) for each (model, k) request; k <= 0 gives inf, k >= n gives 0.0.
    ``l1=False`` skips the L1 of what each threshold keeps (``kept_l1`` is then None).
    The bookkeeping is radix.py's, shared with the torch-free CoreKernels."""
    def level1(targets):
        counts, sums = accumulate(backend, source, score, torch.from_numpy(targets), 1, reduce,
                                  "level1")
        return counts.numpy(), sums.numpy()
    sel, _ = select_tables(hist.tables(), requests, level1, l1)
    return sel


def single_chunk(source: ChunkSource) -> Optional[Chunk]:
    """The chunk of a source that holds a whole tensor in one chunk given as a list (what the
    engine and the API pass for tensors within the budget), else None. A generator source is
    dropped unstarted, so nothing is read."""
    chunks = source()
    if isinstance(chunks, (list, tuple)) and len(chunks) == 1 and chunks[0].offset == 0:
        return chunks[0]
    return None


def select_one_pass(backend, chunk: Chunk, n_models: int, requests: Sequence[tuple[int, int]],
                    score: int, names: Sequence[str] = (), l1: bool = True):
    """``select``'s result for (model, k) requests over one chunk in one read pass, with the
    per-model total L1 (None unless ``l1``), through the backend's ``topk_window`` kernel.
    None where that cannot run (no kernel, a Fisher score) or a window missed: the caller
    then runs the radix selection. Raises like ``level0`` on NaN/Inf task vectors."""
    if getattr(backend, "topk_window", None) is None or score != SCORE_MAGNITUDE:
        return None

    def kernel(rows, l1):
        req = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
        return [x.tolist() for x in backend.topk_window(chunk.base, list(chunk.models), req, l1)]
    return one_pass(requests, chunk.models[0].numel(), n_models, l1, names, kernel)


def select_one_read(backend, source: ChunkSource, n_models: int,
                    requests: Sequence[tuple[int, int]], numel: int, names: Sequence[str] = (),
                    l1: bool = True, max_rows: Optional[int] = None):
    """``select``'s result (with ``Selection.passes``: 1, or 2 where a guessed bin missed) and
    the per-model total L1 (None unless ``l1``) of a magnitude score, reading each chunk once
    where the first chunk's level 0 predicts the k-th bins (radix.radix_select_one_read);
    ``max_rows`` caps the guessed level-1 tables (1 MiB each) held during the read."""
    def hist_chunk(chunk, targets, level, tables):
        backend.histogram_into(chunk, SCORE_MAGNITUDE, torch.from_numpy(targets), level,
                               torch.from_numpy(tables.counts), torch.from_numpy(tables.sums))

    def windows_chunk(chunk, rows, widths, counts, sums):
        backend.score_histogram_windows(chunk.base, list(chunk.models), torch.from_numpy(rows),
                                        list(widths), torch.from_numpy(counts),
                                        torch.from_numpy(sums))
    sel, total, sel.passes = radix_select_one_read(n_models, requests, source, hist_chunk,
                                                   windows_chunk, numel, names, l1,
                                                   max_rows=max_rows)
    return sel, total
