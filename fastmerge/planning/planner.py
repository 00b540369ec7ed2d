"""The one planner: from a resolved MergeSpec to the per-model rows of the fused pass, without
torch. Every path plans through here: ``merge_tensors`` (plan.py wraps the rows as tensors)
and the checkpoint pipeline on every backend (pipeline/driver.py).

The planner runs the passes a method needs before the merge through a ``kernels`` object and
never looks inside a chunk; ``source()`` yields the chunks of one tensor (once per pass).
``kernels`` has three methods:

- ``one_pass(source, requests, n_models, numel, score, names, l1)``: the one-read-pass exact
  top-k (``topk_window``) as ``(Selection, total_l1)``, or None where it cannot run (no
  kernel, a Fisher score, several chunks) or its sampled window missed;
- ``radix(source, requests, n_models, score, names, reduce, l1, hist=None, numel=None)``: the
  two-level radix selection (selection.py, radix.py), always exact, as ``(Selection, total_l1
  or None)``; ``Selection.passes`` says how many reads it made where the kernels count them;
- ``stats(source, score, frows, irows, power, reduce)``: per model [total L1, kept L1,
  sum of preconditioned squares] (float64, summed over chunks and, through ``reduce``, ranks).

A window miss therefore costs that tensor one radix selection, nothing else.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..abi import F_HI, F_LO, F_OTA_SCALE, F_RESCALE, SCORE_MAGNITUDE
from ..methods import MergeSpec
from ..methods.kernel_params import keep_rows, needs_l1, pass_ids, rescale_factors
from .thresholds import per_model, selection_requests

SELECTING = ("topk", "fisher", "band")


@dataclass
class RowPlan:
    """Everything the fused pass needs for one tensor, as plain rows: ``frows`` [N][6] and
    ``irows`` [N][3] (params.py's layout), the enumerated pass arguments ``ids``."""
    spec: MergeSpec
    tensor_name: str
    frows: list
    irows: list
    ids: dict
    passes: int = 0        # read passes over the inputs before the merge pass
    info: dict = field(default_factory=dict)
    # each kernels object's own form of the rows (tensors on a device, packed bytes), made
    # on first use; cleared when the spec changes
    compiled: dict = field(default_factory=dict, repr=False)


def one_pass_source(source, score: int, l1: bool):
    """What the one-pass top-k reads: a tensor of two chunks may offer itself whole
    (pipeline/driver.py, _TensorChunks.whole), so the top-k runs as on one chunk, same
    thresholds (exact either way); not for l1, whose float sums would add in another order
    than over the chunks, nor for a score the one-pass kernels do not take (a wasted read)."""
    whole = None if l1 or score != SCORE_MAGNITUDE else getattr(source, "whole", None)
    return whole or source


def select_thresholds(spec: MergeSpec, numel: int, kernels, source, names: Sequence[str] = (),
                      reduce=None, l1: bool = True, hist=None):
    """Per-model (lo, hi), the L1 each keeps and the per-model total L1 (both None unless
    ``l1``), and the read passes made: one pass where the top-k window decides, else the
    radix selection (``hist``: level-0 histograms gathered already, e.g. over a model)."""
    reqs = selection_requests(spec, numel)
    flat = [(i, k) for i, ks in enumerate(reqs) for k in ks]
    score = pass_ids(spec)["score"]
    got = None
    if hist is None and reduce is None:
        got = kernels.one_pass(one_pass_source(source, score, l1), flat, spec.n_models, numel,
                               score, names, l1)
    passes = 1
    if got is None:
        got = kernels.radix(source, flat, spec.n_models, score, names, reduce, l1, hist, numel)
        passes = 2 if got[0].passes is None else got[0].passes  # 1: level 0 decided
    sel, total_l1 = got
    out, kept = per_model(reqs, sel, l1)
    return out, kept, total_l1, passes


def plan_rows(spec: MergeSpec, numel: int, tensor_name: str, kernels, source,
              thresholds: Optional[Sequence[tuple[float, float]]] = None,
              reduce=None) -> RowPlan:
    """Thresholds, DARE keys and rescale factors for one tensor of ``numel`` elements.

    ``thresholds`` (per-model (lo, hi)) skips the selection: ``scope="model"`` passes the
    model-wide ones here. ``reduce`` (in-place sum over ranks) when ``source`` holds only
    this rank's rows of the tensor (fastmerge/pipeline/parallel.py)."""
    n = spec.n_models
    ids = pass_ids(spec)
    passes, kept_l1, total_l1 = 0, None, None
    if spec.sparsifier in SELECTING and thresholds is None:
        thresholds, kept_l1, total_l1, p = select_thresholds(
            spec, numel, kernels, source, (tensor_name,), reduce, l1=spec.rescale == "l1")
        passes += p
    frows, irows = keep_rows(spec, tensor_name, thresholds)
    need_l1 = needs_l1(spec) and kept_l1 is None
    need_p = spec.combine == "ota" and spec.ota_normalize == "global"
    if need_l1 or need_p:
        stats = kernels.stats(source, ids["score"], frows, irows, spec.power, reduce)
        passes += 1
        if need_l1:
            total_l1, kept_l1 = [r[0] for r in stats], [r[1] for r in stats]
        if need_p:
            for i in range(n):
                frows[i][F_OTA_SCALE] = 1.0 / (stats[i][2] / max(numel, 1) + spec.eps)
    rescale = rescale_factors(spec, total_l1, kept_l1)
    for i in range(n):
        frows[i][F_RESCALE] = rescale[i]
    info = {"thresholds": [(_f32(r[F_LO]), _f32(r[F_HI])) for r in frows], "rescale": rescale}
    return RowPlan(spec, tensor_name, frows, irows, ids, passes, info)


def _f32(x: float) -> float:
    """x rounded to float32, as the fused pass reads it."""
    return struct.unpack("<f", struct.pack("<f", x))[0]
