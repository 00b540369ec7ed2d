"""``Backend``: the primitives one backend provides (the ``fastmerge::`` ops of ops.py), and the
calls the shared planning code (fastmerge/planning) makes through them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..planning.selection import Chunk, ChunkSource


@dataclass
class Backend:
    name: str
    score_histogram: Callable
    model_stats: Callable
    fused_merge: Callable
    # one-pass exact top-k of one chunk (fastmerge::topk_window); only the CPU kernels have a
    # fast one, elsewhere the radix selection (two histogram passes) runs
    topk_window: Optional[Callable] = None
    # level-1 histograms of rows of consecutive prefixes (the CPU kernels, fastmerge._C): lets
    # a chunked selection gather its guessed level-1 bins in the level-0 read
    score_histogram_windows: Optional[Callable] = None

    def histogram_into(self, chunk: Chunk, score: int, targets: torch.Tensor, level: int,
                       counts: torch.Tensor, sums: torch.Tensor) -> None:
        """Add one chunk's histograms into ``counts``/``sums`` (on the chunk's device)."""
        self.score_histogram(chunk.base, list(chunk.models), list(chunk.second_moments), score,
                             targets, level, counts, sums)

    def stats(self, source: ChunkSource, score: int, fparams, iparams, power: float):
        out = None
        for chunk in source():
            dev = chunk.models[0].device
            part = torch.zeros(len(chunk.models), 3, dtype=torch.float64, device=dev)
            self.model_stats(chunk.base, list(chunk.models), list(chunk.second_moments), score,
                             fparams.to(dev), iparams.to(dev), float(power), chunk.offset, part)
            out = part.cpu() if out is None else out + part.cpu()
        return out

    def merge(self, chunk: Chunk, plan, out_dtype: torch.dtype):
        dev = chunk.models[0].device
        plan = plan.on(dev)
        nonfinite = torch.zeros(len(chunk.models), dtype=torch.int64, device=dev)
        out = self.fused_merge(chunk.base, list(chunk.models), list(chunk.second_moments),
                               plan.fparams, plan.iparams, *plan.op_args(), chunk.offset,
                               out_dtype, nonfinite)
        return out, nonfinite.cpu()


def dispatcher_backend(name: str, with_topk_window: bool = False) -> Backend:
    """A Backend over the ``torch.ops.fastmerge`` dispatcher: the extension of backend
    ``name`` registered its kernels for its device's dispatch key."""
    from . import ops  # noqa: F401  (defines the ops the extension registers kernels for)
    o = torch.ops.fastmerge
    return Backend(name, o.score_histogram, o.model_stats, o.fused_merge,
                   o.topk_window if with_topk_window else None)
