"""The planner's rows as tensors: ``plan_tensor`` runs the one planner (planner.py) through a
torch backend's kernels (``BackendKernels``) and returns a :class:`TensorPlan`, whose
``fparams`` / ``iparams`` are what the ``fastmerge::fused_merge`` op takes. Backends never see
user parameters, only the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..abi import SCORE_MAGNITUDE
from ..methods import MergeSpec
from .planner import RowPlan, plan_rows, select_thresholds
from .selection import (
    ChunkSource,
    Histograms,
    level0,
    select,
    select_one_pass,
    select_one_read,
    single_chunk,
)


@dataclass
class TensorPlan:
    """Everything the fused pass needs for one tensor (all of its chunks)."""
    spec: MergeSpec
    tensor_name: str
    fparams: torch.Tensor  # float32 [N, 6]
    iparams: torch.Tensor  # int64 [N, 3]
    combine: int
    score: int
    elect: int
    elect_on: int
    normalize: int
    passes: int = 0        # read passes over the inputs before the merge pass
    info: dict = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: RowPlan, spec: Optional[MergeSpec] = None) -> "TensorPlan":
        """``rows`` as tensors (``spec``: another spec with the same rows, e.g. LiNeS')."""
        return cls(spec=spec or rows.spec, tensor_name=rows.tensor_name,
                   fparams=torch.tensor(rows.frows, dtype=torch.float32),
                   iparams=torch.tensor(rows.irows, dtype=torch.int64), passes=rows.passes,
                   info=rows.info, **rows.ids)

    def op_args(self) -> tuple:
        """The trailing arguments of ``fastmerge::fused_merge`` after the tensors."""
        s = self.spec
        return (self.combine, self.score, self.elect, self.elect_on, self.normalize,
                s.consensus_k, float(s.scale), float(s.power), float(s.eps))

    def on(self, device) -> "TensorPlan":
        if self.fparams.device == torch.device(device):
            return self
        return TensorPlan(**{**self.__dict__, "fparams": self.fparams.to(device),
                             "iparams": self.iparams.to(device)})


class BackendKernels:
    """The planner's kernels (planner.py) over torch Chunks on a backends.Backend."""
    # n_models -> the most guessed level-1 tables a chunked selection may hold; None: no cap
    # (merge_tensors has no memory budget), the pipeline's TorchKernels set one from theirs
    window_rows = None

    def __init__(self, backend):
        self.be = backend

    def one_pass(self, source, requests, n_models, numel, score, names, l1):
        chunk = single_chunk(source)
        if chunk is None:
            return None
        return select_one_pass(self.be, chunk, n_models, requests, score, names, l1)

    def radix(self, source, requests, n_models, score, names, reduce, l1, hist=None, numel=None):
        if hist is None and reduce is None and numel and score == SCORE_MAGNITUDE and \
                getattr(self.be, "score_histogram_windows", None) is not None:
            # level 0 and the guessed level-1 bins in one read of each chunk
            cap = None if self.window_rows is None else self.window_rows(n_models)
            return select_one_read(self.be, source, n_models, requests, numel, names, l1, cap)
        if hist is None:  # ours alone: a reused buffer
            hist = level0(self.be, n_models, score, source, names, reduce, scratch=True)
        sel = select(self.be, hist, requests, score, source, reduce, l1=l1)
        return sel, (hist.total_l1() if l1 else None)

    def level0(self, source, n_models, score, names):
        """Level-0 histograms the caller owns (added over the tensors of a model)."""
        return level0(self.be, n_models, score, source, names)

    def stats(self, source, score, frows, irows, power, reduce):
        f = torch.tensor(frows, dtype=torch.float32)
        ip = torch.tensor(irows, dtype=torch.int64)
        stats = self.be.stats(source, score, f, ip, power)
        if reduce is not None:
            if stats is None:   # no rows here: this rank adds zeros
                stats = torch.zeros(len(frows), 3, dtype=torch.float64)
            reduce(stats)
        return stats.tolist()


def thresholds_from_selection(spec: MergeSpec, numel: int, backend, source: ChunkSource,
                              score: int, names: Sequence[str] = (),
                              hist: Optional[Histograms] = None, reduce=None, l1: bool = True,
                              info: Optional[dict] = None):
    """Per-model (lo, hi) and the L1 of what they keep (planner.select_thresholds on a
    backends.Backend); ``info["passes"]`` gets the number of read passes made."""
    out, kept, total, passes = select_thresholds(spec, numel, BackendKernels(backend), source,
                                                 names, reduce, l1, hist)
    if info is not None:
        info["passes"] = passes
    return out, kept, total


def plan_tensor(spec: MergeSpec, source: ChunkSource, backend, numel: int, tensor_name: str = "",
                thresholds: Optional[Sequence[tuple[float, float]]] = None,
                reduce=None) -> "TensorPlan":
    """planner.plan_rows through ``backend``'s kernels, as a TensorPlan."""
    return TensorPlan.from_rows(plan_rows(spec, numel, tensor_name, BackendKernels(backend),
                                          source, thresholds, reduce))
