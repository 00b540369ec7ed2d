"""torch.library registration of the Triton kernels (``fastmerge::triton_*`` ops).

Each op takes exactly the arguments of its ``fastmerge::`` counterpart (fastmerge/ops.py) and
does no host synchronisation (targets, modes, thresholds and weights are read by the kernels),
so it traces under torch.compile.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional

import torch
from torch.library import triton_op, wrap_triton

from .. import ops
from . import MAX_MODELS, interpreting
from . import _kernels as K

# Elements per program and warps. The interpreter runs one numpy step per program, so big
# blocks are much faster there. On a GPU (sm_90 ptxas, no spills): the fused kernel keeps
# every model's scalar parameters and loaded values live across its model loops, so registers
# grow with N (N=3: 95 registers at 4 elements/thread; N=16: 128 at 1; N=32: 254 at 1); the
# elements per thread shrink as N grows. Not yet measured on a GPU: FASTMERGE_TRITON_BLOCK and
# FASTMERGE_TRITON_WARPS override the choice for tuning (benchmarks/gpu.py).
_BLOCK_INTERP = 8192


def _launch_config(n_models: int) -> tuple[int, int]:
    warps = int(os.environ.get("FASTMERGE_TRITON_WARPS", "8"))
    block = os.environ.get("FASTMERGE_TRITON_BLOCK")
    if block:
        return int(block), warps
    if interpreting():
        return _BLOCK_INTERP, 4
    per_thread = 4 if n_models <= 4 else 2 if n_models <= 8 else 1
    return 32 * warps * per_thread, warps


# Level-0 histograms on a GPU pre-aggregate each block (sort by bin, segmented scans, one
# atomic per distinct bin): 2048 elements x 8 warps compiles to 114 registers, no spills.
# The interpreter runs sort/scan one element at a time, so there the plain atomics are used
# (tests run the aggregated path on small blocks). FASTMERGE_TRITON_HIST_AGGREGATE=0/1
# overrides the choice.
_HIST_AGG_BLOCK = 2048


def _aggregate_histogram(level: int) -> bool:
    env = os.environ.get("FASTMERGE_TRITON_HIST_AGGREGATE")
    if env is not None and env != "":
        return env not in ("0", "false", "False")
    return level == 0 and not interpreting()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def _slots(base: Optional[torch.Tensor], models: List[torch.Tensor],
           second_moments: List[torch.Tensor], need_v: bool):
    """(base or dummy, [MAX_MODELS model slots], [MAX_MODELS second-moment slots], has_v)."""
    n = len(models)
    if n == 0:
        raise ValueError("the Triton kernels need at least one model")
    if n > MAX_MODELS:
        raise ValueError(f"the Triton kernels take at most {MAX_MODELS} models in one pass "
                         f"(got {n})")
    ms = [_flat(m) for m in models]
    numel = ms[0].numel()
    for k, m in enumerate(ms):
        if m.numel() != numel:
            raise ValueError(f"models[{k}] has {m.numel()} elements, models[0] {numel}")
    has_v = bool(need_v and len(second_moments) > 0)
    if has_v and len(second_moments) != n:
        raise ValueError(f"{len(second_moments)} second-moment tensors for {n} models")
    vs = [_flat(v) for v in second_moments] if has_v else []
    dummy = ms[0]
    b = _flat(base) if base is not None else dummy
    return b, ms + [dummy] * (MAX_MODELS - n), vs + [dummy] * (MAX_MODELS - len(vs)), has_v


def _skip_fake(*tensors) -> bool:
    """Under the interpreter, wrap_triton would run the interpreter on FakeTensors (no data);
    the fake pass needs only the output metadata, so launch nothing there. On a GPU the
    wrap_triton machinery handles fake/proxy tensors itself: never skip."""
    if not interpreting():
        return False
    from torch._subclasses.fake_tensor import FakeTensor
    return any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors)


def _grid_1d(numel: int, block: int) -> int:
    return (numel + block - 1) // block


@triton_op("fastmerge::triton_score_histogram", mutates_args={"counts", "sums"})
def triton_score_histogram(base: Optional[torch.Tensor], models: List[torch.Tensor],
                           second_moments: List[torch.Tensor], score: int,
                           targets: torch.Tensor, level: int, counts: torch.Tensor,
                           sums: torch.Tensor) -> None:
    b, ms, vs, has_v = _slots(base, models, second_moments, score == 1)
    numel = models[0].numel()
    rows = targets.shape[0]
    if numel == 0 or rows == 0 or _skip_fake(counts, models[0]):
        return
    aggregate = _aggregate_histogram(int(level))
    block, warps = _launch_config(len(models))
    if aggregate and not os.environ.get("FASTMERGE_TRITON_BLOCK"):
        block, warps = _HIST_AGG_BLOCK, 8
    tg = targets.to(torch.int64).contiguous()
    wrap_triton(K._score_histogram_kernel)[(_grid_1d(numel, block), rows)](
        b, *ms, *vs, tg, counts, sums, numel,
        N=len(models), HAS_BASE=base is not None, HAS_V=has_v, SCORE=int(score),
        LEVEL=int(level), AGGREGATE=aggregate, BLOCK=block, num_warps=warps)


@triton_op("fastmerge::triton_model_stats", mutates_args={"out"})
def triton_model_stats(base: Optional[torch.Tensor], models: List[torch.Tensor],
                       second_moments: List[torch.Tensor], score: int, fparams: torch.Tensor,
                       iparams: torch.Tensor, power: float, offset: int,
                       out: torch.Tensor) -> None:
    b, ms, vs, has_v = _slots(base, models, second_moments, True)
    numel = models[0].numel()
    if numel == 0 or _skip_fake(out, models[0]):
        return
    block, warps = _launch_config(len(models))
    wrap_triton(K._model_stats_kernel)[(_grid_1d(numel, block),)](
        b, *ms, *vs, fparams.to(torch.float32).contiguous(), iparams.contiguous(), out, numel,
        int(offset), float(power),
        N=len(models), HAS_BASE=base is not None, HAS_V=has_v, SCORE=int(score),
        INTERP=interpreting(), BLOCK=block, num_warps=warps)


@triton_op("fastmerge::triton_fused_merge", mutates_args={"nonfinite"})
def triton_fused_merge(base: Optional[torch.Tensor], models: List[torch.Tensor],
                       second_moments: List[torch.Tensor], fparams: torch.Tensor,
                       iparams: torch.Tensor, combine: int, score: int, elect: int,
                       elect_on: int, normalize: int, consensus_k: int, scale: float,
                       power: float, eps: float, offset: int, out_dtype: torch.dtype,
                       nonfinite: torch.Tensor) -> torch.Tensor:
    combine = int(combine)
    need_v = combine == 5 or int(score) == 1
    b, ms, vs, has_v = _slots(base if combine != 0 else None, models, second_moments, need_v)
    out = torch.empty(models[0].shape, dtype=out_dtype, device=models[0].device)
    numel = out.numel()
    if numel == 0 or _skip_fake(out, models[0]):
        return out
    block, warps = _launch_config(len(models))
    wrap_triton(K._fused_merge_kernel)[(_grid_1d(numel, block),)](
        b, *ms, *vs, fparams.to(torch.float32).contiguous(), iparams.contiguous(),
        out.reshape(-1), nonfinite, numel, int(offset), int(consensus_k), float(scale),
        float(power), float(eps),
        N=len(models), HAS_BASE=base is not None and combine != 0, HAS_V=has_v,
        COMBINE=combine, SCORE=int(score), ELECT=int(elect), ELECT_ON=int(elect_on),
        NORMALIZE=int(normalize), INTERP=interpreting(), BLOCK=block,
        num_warps=warps)
    return out


# The Backend functions: the same signatures as ops.score_histogram_torch & co. More models
# than the kernels have slots (MAX_MODELS) fall back, with a warning, to the plain-torch
# kernels of ops.py on the same device, so backend="auto" on a GPU never refuses a merge.
def _too_many(models) -> bool:
    if len(models) <= MAX_MODELS:
        return False
    warnings.warn(f"the Triton kernels take at most {MAX_MODELS} models per pass; merging "
                  f"{len(models)} with the plain-torch kernels instead", RuntimeWarning,
                  stacklevel=3)
    return True


def score_histogram(base, models, second_moments, score, targets, level, counts, sums):
    if _too_many(models):
        return ops.score_histogram_torch(base, models, second_moments, score, targets, level,
                                         counts, sums)
    torch.ops.fastmerge.triton_score_histogram(base, list(models), list(second_moments),
                                               int(score), targets, int(level), counts, sums)


def model_stats(base, models, second_moments, score, fparams, iparams, power, offset, out):
    if _too_many(models):
        return ops.model_stats_torch(base, models, second_moments, score, fparams, iparams,
                                     power, offset, out)
    torch.ops.fastmerge.triton_model_stats(base, list(models), list(second_moments), int(score),
                                           fparams, iparams, float(power), int(offset), out)


def fused_merge(base, models, second_moments, fparams, iparams, combine, score, elect,
                elect_on, normalize, consensus_k, scale, power, eps, offset, out_dtype,
                nonfinite):
    if _too_many(models):
        return ops.fused_merge_torch(base, models, second_moments, fparams, iparams, combine,
                                     score, elect, elect_on, normalize, consensus_k, scale,
                                     power, eps, offset, out_dtype, nonfinite)
    return torch.ops.fastmerge.triton_fused_merge(
        base, list(models), list(second_moments), fparams, iparams, int(combine), int(score),
        int(elect), int(elect_on), int(normalize), int(consensus_k), float(scale),
        float(power), float(eps), int(offset), out_dtype, nonfinite)
