"""The packed per-model parameters of the fused pass, without torch: the rows of ``fparams`` /
``iparams`` for a spec (their layout and enumerations come from fastmerge.abi, generated from
csrc/common/fastmerge_params.h), which plan.py turns into tensors and core_kernels.py packs as
bytes."""
from __future__ import annotations

import struct
from typing import Optional, Sequence

from .. import abi
from . import COMBINES, MergeSpec, rng

# combine name -> the kernels' COMBINE_* id: its index in COMBINES (tests/test_abi.py checks
# the order against abi.COMBINE_LINEAR, COMBINE_SUM, ...)
COMBINE_IDS = {name: i for i, name in enumerate(COMBINES)}

INF = float("inf")


def _as_int64_bits(u64: int) -> int:
    return u64 - (1 << 64) if u64 >= 1 << 63 else u64


def keep_rows(spec: MergeSpec, tensor_name: str,
              thresholds: Optional[Sequence[tuple[float, float]]] = None
              ) -> tuple[list[list[float]], list[list[int]]]:
    """fparams [N][NUM_FPARAMS] and iparams [N][NUM_IPARAMS] rows with rescale 1 and OTA
    scale 1: weights, consensus lambdas, keep modes from ``thresholds`` (per-model (lo, hi) for
    top-k / band / FFG sparsifiers) or the DARE keys and thresholds."""
    f = [[0.0] * abi.NUM_FPARAMS for _ in range(spec.n_models)]
    ip = [[0] * abi.NUM_IPARAMS for _ in range(spec.n_models)]
    for i in range(spec.n_models):
        f[i][abi.F_WEIGHT] = float(spec.weights[i])
        f[i][abi.F_RESCALE] = 1.0
        f[i][abi.F_HI] = INF
        f[i][abi.F_CONSENSUS_LAMBDA] = float(spec.consensus_lambdas[i])
        f[i][abi.F_OTA_SCALE] = 1.0
    if spec.sparsifier in ("topk", "fisher", "band"):
        for i, (lo, hi) in enumerate(thresholds):
            f[i][abi.F_LO], f[i][abi.F_HI] = lo, hi
            ip[i][abi.I_MODE] = (abi.MODE_KEEP_NONE if lo == INF else
                                 abi.MODE_KEEP_ALL if lo <= 0.0 and hi == INF else
                                 abi.MODE_BAND)
    elif spec.sparsifier == "dare":
        for i, d in enumerate(spec.densities):
            thr = rng.dare_keep_threshold(d)
            ip[i][abi.I_MODE] = (abi.MODE_KEEP_ALL if thr >= 1 << 32 else
                                 abi.MODE_KEEP_NONE if thr == 0 else abi.MODE_DARE)
            ip[i][abi.I_DARE_KEY] = _as_int64_bits(rng.dare_key(spec.seed, tensor_name, i))
            ip[i][abi.I_DARE_THRESHOLD] = thr
    return f, ip


def needs_l1(spec: MergeSpec) -> bool:
    """rescale="l1" scales by sum |t_i| / sum of the kept |t_i| (a statistics pass, unless the
    selection gathered them)."""
    return spec.rescale == "l1" and spec.sparsifier != "none"


def rescale_factors(spec: MergeSpec, total_l1, kept_l1) -> list[float]:
    out = [1.0] * spec.n_models
    for i, d in enumerate(spec.densities):
        if spec.rescale == "inverse_density":
            out[i] = 1.0 / d if d > 0 else 0.0
        elif needs_l1(spec):
            out[i] = total_l1[i] / kept_l1[i] if kept_l1[i] > 0 else 1.0
    return out


def pass_ids(spec: MergeSpec) -> dict:
    """The enumerated arguments of the fused pass for ``spec``."""
    normalize = {False: abi.NORMALIZE_NONE, True: abi.NORMALIZE_WEIGHTS,
                 "count": abi.NORMALIZE_COUNT}
    return dict(combine=COMBINE_IDS[spec.combine],
                score=abi.SCORE_FISHER if spec.score == "fisher" else abi.SCORE_MAGNITUDE,
                elect=abi.ELECT_SUM if spec.election == "sum" else abi.ELECT_COUNT,
                elect_on=(abi.ELECT_WEIGHTED if spec.elect_on == "weighted" else
                          abi.ELECT_UNWEIGHTED),
                normalize=normalize[spec.normalize])


def pack_rows(f: list[list[float]], ip: list[list[int]]) -> tuple[bytes, bytes]:
    """float32 and int64 row-major bytes of the rows (what fastmerge._core takes)."""
    return (struct.pack(f"<{len(f) * abi.NUM_FPARAMS}f", *[x for r in f for x in r]),
            struct.pack(f"<{len(ip) * abi.NUM_IPARAMS}q", *[x for r in ip for x in r]))
