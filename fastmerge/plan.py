"""From a resolved MergeSpec to the packed per-model parameters of the fused merge pass.

``plan_tensor`` runs the passes a method needs before the merge (radix selection for top-k,
bands and FFG; one statistics pass for DARE + ``rescale="l1"`` or OTA's per-tensor means) over
a re-iterable chunk source, through whichever backend is given, and returns a
:class:`TensorPlan`. Backends never see user parameters, only the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .methods import MergeSpec
from .params import (F_HI, F_LO, F_OTA_SCALE, F_RESCALE, keep_rows, needs_l1, pass_ids,
                     rescale_factors)
from .selection import (ChunkSource, Histograms, level0, select, select_one_pass,
                        single_chunk)
from .thresholds import per_model, selection_requests



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


def thresholds_from_selection(spec: MergeSpec, numel: int, backend, source: ChunkSource,
                              score: int, names: Sequence[str] = (),
                              hist: Optional[Histograms] = None, reduce=None, l1: bool = True,
                              info: Optional[dict] = None):
    """Per-model (lo, hi) and the L1 of what they keep, by radix selection over ``source``.
    ``reduce``: sums histograms over ranks when ``source`` is this rank's part of the data.
    ``l1=False``: the two L1 lists come back None (only ``rescale="l1"`` needs them).
    A whole tensor in one chunk on a backend with the one-pass kernel is selected in one read
    pass (``select_one_pass``); ``info["passes"]`` gets the number of read passes made."""
    reqs = selection_requests(spec, numel)
    flat = [(i, k) for i, ks in enumerate(reqs) for k in ks]
    got = None
    if hist is None and reduce is None:
        chunk = single_chunk(source)
        if chunk is not None:
            got = select_one_pass(backend, chunk, spec.n_models, flat, score, names, l1)
    if got is not None:
        sel, total_l1 = got
        passes = 1
    else:
        if hist is None:  # ours alone: a reused buffer
            hist = level0(backend, spec.n_models, score, source, names, reduce, scratch=True)
        sel = select(backend, hist, flat, score, source, reduce, l1=l1)
        total_l1 = hist.total_l1() if l1 else None
        passes = 2
    if info is not None:
        info["passes"] = passes
    out, kept = per_model(reqs, sel, l1)
    return out, kept, total_l1


def plan_tensor(spec: MergeSpec, source: ChunkSource, backend, numel: int, tensor_name: str = "",
                thresholds: Optional[Sequence[tuple[float, float]]] = None,
                reduce=None) -> TensorPlan:
    """Resolve thresholds, DARE keys and rescale factors for one tensor of ``numel`` elements.

    ``thresholds`` (per-model (lo, hi)) skips the selection: ``scope="model"`` passes the
    model-wide ones here. ``reduce`` (in-place sum over ranks) when ``source`` holds only
    this rank's rows of the tensor (fastmerge/engine/parallel.py)."""
    n = spec.n_models
    ids = pass_ids(spec)
    score = ids["score"]
    passes, kept_l1, total_l1 = 0, None, None
    names = (tensor_name,)

    if spec.sparsifier in ("topk", "fisher", "band") and thresholds is None:
        how: dict = {}
        thresholds, kept_l1, total_l1 = thresholds_from_selection(
            spec, numel, backend, source, score, names, reduce=reduce,
            l1=spec.rescale == "l1", info=how)
        passes += how["passes"]
    frows, irows = keep_rows(spec, tensor_name, thresholds)
    f = torch.tensor(frows, dtype=torch.float32)
    iparams = torch.tensor(irows, dtype=torch.int64)

    need_l1 = needs_l1(spec) and kept_l1 is None
    need_p = spec.combine == "ota" and spec.ota_normalize == "global"
    stats = None
    if need_l1 or need_p:
        stats = backend.stats(source, score, f, iparams, spec.power)
        if reduce is not None:
            if stats is None:   # no rows here: this rank adds zeros
                stats = torch.zeros(n, 3, dtype=torch.float64)
            reduce(stats)
        passes += 1
        if need_l1:
            total_l1, kept_l1 = stats[:, 0].tolist(), stats[:, 1].tolist()
        if need_p:
            for i in range(n):
                f[i, F_OTA_SCALE] = 1.0 / (stats[i, 2].item() / max(numel, 1) + spec.eps)

    rescale = rescale_factors(spec, total_l1, kept_l1)
    f[:, F_RESCALE] = torch.tensor(rescale, dtype=torch.float64).to(torch.float32)
    return TensorPlan(
        spec=spec, tensor_name=tensor_name, fparams=f, iparams=iparams, passes=passes,
        info={"thresholds": [tuple(map(float, r)) for r in f[:, [F_LO, F_HI]].tolist()],
              "rescale": rescale}, **ids)
