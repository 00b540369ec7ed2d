"""torch.library registration of the Triton kernels (``fastmerge::triton_*`` ops).

Each op takes exactly the arguments of its ``fastmerge::`` counterpart
(fastmerge/backends/ops.py) and does no host synchronisation (targets, modes, thresholds and
weights are read by the kernels),
so it traces under torch.compile.

Every launch runs on the device of its tensors (checked to be one device, then
``torch.cuda.device``): a Triton launch otherwise goes to the *current* device and its stream.
Compiled launches pass ``enable_fp_fusion=False`` (no FMA contraction, like the CPU and CUDA
kernels). Under the interpreter the kernels are called directly, not through ``wrap_triton``
(torch < 2.13 accepts only compiled JIT kernels there; the interpreter needs no tracing).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import List, Optional

import torch
from torch.library import triton_op, wrap_triton

from ... import abi
from .. import ops  # noqa: F401  (the fastmerge:: library these ops join)
from ..pytorch import kernels as plain
from . import _kernels as K
from . import _peel
from ._kernels import MAX_MODELS
from ._mode import interpreting

# Elements per program and warps. The interpreter runs one numpy step per program, so big
# blocks are much faster there. On a GPU (sm_90 ptxas, no spills): the fused kernel keeps
# every model's scalar parameters and loaded values live across its model loops, so registers
# grow with N (N=3: 95 registers at 4 elements/thread; N=16: 128 at 1; N=32: 254 at 1); the
# elements per thread shrink as N grows. Not yet measured on a GPU: FASTMERGE_TRITON_BLOCK and
# FASTMERGE_TRITON_WARPS override the choice for tuning (benchmarks/gpu.py).
_BLOCK_INTERP = 8192


# Above 16 models the merge kernel wants more than 128 registers a thread (ptxas, sm_90, TIES,
# triton 3.9: N = 16 127, N = 32 255, one block of 256 threads per SM); capped at 128 it keeps
# two blocks resident for ~200 bytes of spills at N = 32 (`compile_check --regs --many-models`).
# Triton 3.6 (the GPU kit's) allocates more: N = 8 138, N = 16 149, N = 32 capped with 188
# bytes of spills. Not yet measured on a GPU: FASTMERGE_TRITON_MAXNREG overrides the cap (0: none).
_MAXNREG_ABOVE = 16


def _merge_options(n_models: int) -> dict:
    if interpreting():
        return {}
    env = os.environ.get("FASTMERGE_TRITON_MAXNREG")
    cap = int(env) if env else (128 if n_models > _MAXNREG_ABOVE else 0)
    return {"maxnreg": cap} if cap > 0 else {}


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


def _launcher(kernel, grid):
    """kernel[grid] as torch.library expects it: through wrap_triton when compiled (so that
    torch.compile traces the launch); called directly in the interpreter."""
    if interpreting():
        return kernel[grid]
    return wrap_triton(kernel)[grid]


def _options() -> dict:
    """Launch options of every compiled kernel: no FMA contraction (see _kernels._mul)."""
    return {} if interpreting() else {"enable_fp_fusion": False}


def _one_device(op: str, named) -> torch.device:
    """The device all of an op's tensors are on; a ValueError naming the first that is not."""
    dev = None
    for what, t in named:
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, what
        elif t.device != dev:
            raise ValueError(f"fastmerge::{op}: {what} is on {t.device} but {first} is on {dev}; "
                             f"move every tensor of the call to one device")
    return dev


def _device_guard(dev: torch.device):
    """Make ``dev`` the current CUDA device for a launch (its stream is then the current one)."""
    if dev is not None and dev.type == "cuda":
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


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


def _tracing(tensors) -> bool:
    """Whether torch.compile traces the call (no data pointers to look at)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return torch.compiler.is_compiling() or any(
        isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors)


def _pieces(numel, tensors) -> list:
    """(start, count) launches of one call (_peel.py): an unaligned head, a body Triton
    vectorises, a tail. One piece while torch.compile traces."""
    if _tracing(tensors):
        return [(0, numel)]
    return _peel.pieces(numel, _peel.tensor_spans(tensors))


def _merge_output(inputs, shape, dtype, device) -> torch.Tensor:
    """A fresh output misaligned like its inputs (views at an odd element offset), so that
    the call's head aligns it too and the body keeps vector stores."""
    shift = 0 if _tracing(inputs) else _peel.out_shift(
        _peel.tensor_spans(inputs), torch.empty((), dtype=dtype).element_size())
    if shift == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    return torch.empty(numel + shift, dtype=dtype, device=device)[shift:].view(shape)


def _piece(flat, start: int, count: int, whole: int):
    """Elements [start, start + count) of each flat tensor of a call (itself when whole)."""
    if count == whole:
        return flat
    cache = {}
    return [cache.setdefault(id(t), t[start:start + count]) for t in flat]


def _named(base, models, second_moments, **others):
    named = [("base", base)] + [(f"models[{k}]", m) for k, m in enumerate(models)]
    named += [(f"second_moments[{k}]", v) for k, v in enumerate(second_moments)]
    return named + list(others.items())


# 2^(28 k - 149): the weight of limb k of the Fisher histograms' fixed-point |t| sums.
def _limb_scales(device) -> torch.Tensor:
    k = torch.arange(K.NUM_LIMBS.value, dtype=torch.float64, device=device)
    return torch.exp2(k * K.LIMB_BITS.value - 149.0)


@triton_op("fastmerge::triton_score_histogram", mutates_args={"counts", "sums"})
def triton_score_histogram(base: Optional[torch.Tensor], models: List[torch.Tensor],
                           second_moments: List[torch.Tensor], score: int,
                           targets: torch.Tensor, level: int, counts: torch.Tensor,
                           sums: torch.Tensor) -> None:
    dev = _one_device("triton_score_histogram", _named(
        base, models, second_moments if score == 1 else [], targets=targets, counts=counts,
        sums=sums))
    b, ms, vs, has_v = _slots(base, models, second_moments, score == 1)
    numel = models[0].numel()
    rows = targets.shape[0]
    if numel == 0 or rows == 0 or _skip_fake(counts, models[0]):
        return
    limbs = int(score) == 1   # the Fisher score: exact integer |t| sums (order-free)
    aggregate = _aggregate_histogram(int(level)) and not limbs
    block, warps = _launch_config(len(models))
    if aggregate and not os.environ.get("FASTMERGE_TRITON_BLOCK"):
        block, warps = _HIST_AGG_BLOCK, 8
    tg = targets.to(torch.int64).contiguous()
    acc = (torch.zeros(rows, abi.NUM_BINS, K.NUM_LIMBS.value, dtype=torch.int64, device=dev)
           if limbs else counts)
    flat = [b, *ms, *vs]
    # counts are integers and the sums exact: how the call is split changes no bit
    with _device_guard(dev):
        for start, count in _pieces(numel, flat):
            _launcher(K._score_histogram_kernel, (_grid_1d(count, block), rows))(
                *_piece(flat, start, count, numel), tg, counts, sums, acc, count,
                N=len(models), HAS_BASE=base is not None, HAS_V=has_v, SCORE=int(score),
                LEVEL=int(level), AGGREGATE=aggregate, LIMBS=limbs, BLOCK=block,
                num_warps=warps, **_options())
    if limbs:
        sums.add_((acc.to(torch.float64) * _limb_scales(dev)).sum(-1).view_as(sums))


@triton_op("fastmerge::triton_model_stats", mutates_args={"out"})
def triton_model_stats(base: Optional[torch.Tensor], models: List[torch.Tensor],
                       second_moments: List[torch.Tensor], score: int, fparams: torch.Tensor,
                       iparams: torch.Tensor, power: float, offset: int,
                       out: torch.Tensor) -> None:
    dev = _one_device("triton_model_stats", _named(
        base, models, second_moments, fparams=fparams, iparams=iparams, out=out))
    b, ms, vs, has_v = _slots(base, models, second_moments, True)
    numel = models[0].numel()
    if numel == 0 or _skip_fake(out, models[0]):
        return
    block, warps = _launch_config(len(models))
    grid = _grid_1d(numel, block)
    # per-program partial sums, added up by torch in a fixed order: no float64 atomics, so
    # the statistics do not depend on the order in which the programs run
    partial = torch.zeros(grid, len(models), 3, dtype=torch.float64, device=dev)
    with _device_guard(dev):
        _launcher(K._model_stats_kernel, (grid,))(
            b, *ms, *vs, fparams.to(torch.float32).contiguous(), iparams.contiguous(), partial,
            numel, int(offset), float(power),
            N=len(models), HAS_BASE=base is not None, HAS_V=has_v, SCORE=int(score),
            INTERP=interpreting(), BLOCK=block, num_warps=warps, **_options())
    out.add_(partial.sum(0).view_as(out))


@triton_op("fastmerge::triton_fused_merge", mutates_args={"nonfinite"})
def triton_fused_merge(base: Optional[torch.Tensor], models: List[torch.Tensor],
                       second_moments: List[torch.Tensor], fparams: torch.Tensor,
                       iparams: torch.Tensor, combine: int, score: int, elect: int,
                       elect_on: int, normalize: int, consensus_k: int, scale: float,
                       power: float, eps: float, offset: int, out_dtype: torch.dtype,
                       nonfinite: torch.Tensor) -> torch.Tensor:
    combine = int(combine)
    need_v = combine == 5 or int(score) == 1
    dev = _one_device("triton_fused_merge", _named(
        base if combine != 0 else None, models, second_moments if need_v else [],
        fparams=fparams, iparams=iparams, nonfinite=nonfinite))
    b, ms, vs, has_v = _slots(base if combine != 0 else None, models, second_moments, need_v)
    out = _merge_output([b, *ms, *vs], models[0].shape, out_dtype, models[0].device)
    numel = out.numel()
    if numel == 0 or _skip_fake(out, models[0]):
        return out
    block, warps = _launch_config(len(models))
    fp, ip = fparams.to(torch.float32).contiguous(), iparams.contiguous()
    flat = [b, *ms, *vs, out.reshape(-1)]
    with _device_guard(dev):
        for start, count in _pieces(numel, flat):
            *ins, o = _piece(flat, start, count, numel)
            _launcher(K._fused_merge_kernel, (_grid_1d(count, block),))(
                *ins, fp, ip, o, nonfinite, count, int(offset) + start, int(consensus_k),
                float(scale), float(power), float(eps),
                N=len(models), HAS_BASE=base is not None and combine != 0, HAS_V=has_v,
                COMBINE=combine, SCORE=int(score), ELECT=int(elect), ELECT_ON=int(elect_on),
                NORMALIZE=int(normalize), INTERP=interpreting(), BLOCK=block,
                num_warps=warps, **_options(), **_merge_options(len(models)))
    return out


# The Backend functions: the same signatures as ops.score_histogram_torch & co. More models
# than the kernels have slots (MAX_MODELS) fall back, with a warning, to the plain-torch
# kernels (backends/pytorch) on the same device, so backend="auto" on a GPU never refuses a merge.
def _too_many(models) -> bool:
    if len(models) <= MAX_MODELS:
        return False
    warnings.warn(f"the Triton kernels take at most {MAX_MODELS} models per pass; merging "
                  f"{len(models)} with the plain-torch kernels instead", RuntimeWarning,
                  stacklevel=3)
    return True


def score_histogram(base, models, second_moments, score, targets, level, counts, sums):
    if _too_many(models):
        return plain.score_histogram_torch(base, models, second_moments, score, targets, level,
                                         counts, sums)
    torch.ops.fastmerge.triton_score_histogram(base, list(models), list(second_moments),
                                               int(score), targets, int(level), counts, sums)


def model_stats(base, models, second_moments, score, fparams, iparams, power, offset, out):
    if _too_many(models):
        return plain.model_stats_torch(base, models, second_moments, score, fparams, iparams,
                                     power, offset, out)
    torch.ops.fastmerge.triton_model_stats(base, list(models), list(second_moments), int(score),
                                           fparams, iparams, float(power), int(offset), out)


def fused_merge(base, models, second_moments, fparams, iparams, combine, score, elect,
                elect_on, normalize, consensus_k, scale, power, eps, offset, out_dtype,
                nonfinite):
    if _too_many(models):
        return plain.fused_merge_torch(base, models, second_moments, fparams, iparams, combine,
                                     score, elect, elect_on, normalize, consensus_k, scale,
                                     power, eps, offset, out_dtype, nonfinite)
    return torch.ops.fastmerge.triton_fused_merge(
        base, list(models), list(second_moments), fparams, iparams, int(combine), int(score),
        int(elect), int(elect_on), int(normalize), int(consensus_k), float(scale),
        float(power), float(eps), int(offset), out_dtype, nonfinite)
