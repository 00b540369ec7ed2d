"""The public tensor API: ``merge_tensors`` and its building blocks."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .abi import SCORE_MAGNITUDE
from .backends import Backend, get_backend
from .methods import METHODS, canonical_method, resolve_spec, rng
from .methods.mergekit_methods import MERGEKIT_METHODS
from .planning.plan import TensorPlan, plan_tensor
from .planning.selection import Chunk, level0, select

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _merge_mergekit_method(base, models, method, parameters, tensor_name, seed, out_dtype,
                           backend="auto"):
    """A mergekit method on in-memory tensors. One linear combination per tensor
    (``Method.combination``): the float64 Gram matrix, the coefficients, the backend's fused
    weighted sum (as the checkpoint pipeline); otherwise the float32 reference on the CPU."""
    from .methods.core import Job, check_finite, gram_matrix
    check_inputs(base, models, None, tensor_name)
    m = MERGEKIT_METHODS[method]
    name = tensor_name or "tensor"
    ref = base if base is not None else models[0]
    out_dtype = out_dtype or ref.dtype
    m.schema.check_inputs(base is not None, len(models))
    has_base, n = m.view(base is not None, len(models))
    with_base = base is not None and m.schema.base != "ignored"
    job = Job(tuple(ref.shape), m.schema.resolve(parameters, n), name,
              0 if seed is None else seed, has_base, n)
    comb = m.combination(job)
    if comb is None:
        from .backends.cpu.della import merge_in_memory
        out = merge_in_memory(m, job, base.cpu() if base is not None else None,
                              [x.cpu() for x in models], out_dtype, torch.get_num_threads())
        if out is not None:
            return out.to(device=ref.device)
        out = m.merge(None if base is None else base.cpu(), [x.cpu() for x in models],
                      parameters, name=name, seed=job.seed)
        return out.to(device=ref.device, dtype=out_dtype)
    inputs = list(models) + ([base] if with_base else [])
    for i, x in enumerate(inputs):
        check_finite(x, name, f"model {i}" if i < len(models) else "the base model")
    gram = None if comb.gram is None else \
        gram_matrix(models, base if with_base else None, comb.gram == "tasks")
    coeffs = [float(c) for c in comb.coefficients(gram)]
    return merge_tensors(None, inputs, "linear", weights=coeffs, normalize=False,
                         backend=backend, out_dtype=out_dtype, tensor_name=tensor_name)


def check_inputs(base: Optional[torch.Tensor], models: Sequence[torch.Tensor],
                 second_moments=None, tensor_name: str = "", needs_base: bool = True) -> None:
    """Shapes, dtypes and devices agree; errors name the tensor and which input is wrong."""
    label = f"tensor {tensor_name!r}" if tensor_name else "merge_tensors"
    if isinstance(models, torch.Tensor) or not isinstance(models, (list, tuple)):
        raise ValueError(f"{label}: models must be a list of tensors, got {type(models).__name__}")
    if len(models) == 0:
        raise ValueError(f"{label}: at least one model tensor is needed")
    named = ([("base", base)] if base is not None else []) + \
        [(f"models[{i}]", m) for i, m in enumerate(models)] + \
        [(f"second_moments[{i}]", v) for i, v in enumerate(second_moments or ())]
    ref_name, ref = named[0]
    for what, x in named:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{label}: {what} is a {type(x).__name__}, not a tensor")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{label}: {what} has dtype {x.dtype}; supported: bfloat16, "
                             f"float16, float32")
        if x.shape != ref.shape:
            raise ValueError(f"{label}: {what} has shape {tuple(x.shape)} but {ref_name} has "
                             f"{tuple(ref.shape)}")
        if x.device != ref.device:
            raise ValueError(f"{label}: {what} is on {x.device} but {ref_name} is on {ref.device}")


def merge_tensors(base: Optional[torch.Tensor], models: Sequence[torch.Tensor], method: str, *,
                  weights=None, density=None, gamma=None, lambda_=None, normalize=None,
                  rescale="default", election=None, elect_on=None, seed=None,
                  tensor_name: str = "", lines_factor=None, consensus_lambda=None,
                  consensus_k=None, second_moments=None, power=None, ota_normalize=None,
                  eps=None, ffg_metric=None, thresholds=None, backend: str = "auto",
                  out_dtype: Optional[torch.dtype] = None,
                  parameters: Optional[dict] = None) -> torch.Tensor:
    """Merge N fine-tuned versions of one tensor.

    Args:
        base: the base model's tensor, shape S, bf16/fp16/fp32 (None: ``models`` are task
            vectors, or the method is ``linear``).
        models: N tensors of shape S (any mix of bf16/fp16/fp32, same device).
        method: one of ``fastmerge.METHODS`` (see the README's method table).
        weights, density, gamma, consensus_lambda: one number, or one per model.
        lambda_: scale on the merged task vector; lines_factor: the LiNeS factor L(tensor).
        normalize: True (divide by the summed weights), False, or "count" (peft's ties).
        rescale: None, "l1" or "inverse_density" (default: the method's).
        election: "sum" or "count"; elect_on: "weighted" or "unweighted" (peft).
        seed, tensor_name: the DARE mask is a function of (seed, tensor_name, model index).
        second_moments: N tensors of shape S (Adam exp_avg_sq) for ffg / ota / ota_ffg.
        thresholds: per-model (lo, hi) score thresholds to use instead of selecting them here
            (the model-wide thresholds of ``scope="model"``).
        backend: "auto", "torch", "cpu", "cuda" or "triton".
        out_dtype: the output dtype (default: the base's, else the first model's).
        parameters: for mergekit's own methods (slerp, model_stock, della, ...: ``fastmerge
            methods``), their parameters by mergekit's names, e.g. ``{"t": 0.5}``.
    Returns:
        A tensor of shape S and dtype ``out_dtype`` on the inputs' device.
    """
    if method in MERGEKIT_METHODS:
        return _merge_mergekit_method(base, models, method, parameters, tensor_name, seed,
                                      out_dtype, backend)
    if parameters is not None:
        raise ValueError(f"parameters= is for mergekit's own methods; {method!r} takes "
                         f"keyword arguments")
    name = canonical_method(method)
    needs_v = METHODS[name].needs_second_moments
    check_inputs(base, models, second_moments if needs_v else None, tensor_name)
    spec = resolve_spec(name, len(models), weights=weights, density=density, gamma=gamma,
                        lambda_=lambda_, normalize=normalize, rescale=rescale,
                        election=election, elect_on=elect_on, seed=seed,
                        lines_factor=lines_factor, consensus_lambda=consensus_lambda,
                        consensus_k=consensus_k, ffg_metric=ffg_metric, power=power,
                        ota_normalize=ota_normalize, eps=eps)
    if spec.combine == "linear" and spec.scale != 1.0:
        raise ValueError("linear averages the models themselves; lambda_ and lines_factor act "
                         "on task vectors and must stay 1 for it")
    if out_dtype is None:
        out_dtype = (base if base is not None else models[0]).dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"out_dtype must be one of bfloat16, float16, float32; got {out_dtype}")
    if spec.needs_second_moments:
        from .reference import check_second_moments
        check_second_moments(second_moments, len(models), models[0].shape, tensor_name)
    if thresholds is not None and len(thresholds) != len(models):
        raise ValueError(f"thresholds has {len(thresholds)} entries but there are "
                         f"{len(models)} models")
    be = get_backend(backend, models[0].device)
    chunk = Chunk(None if base is None else base.contiguous(),
                  [m.contiguous() for m in models],
                  [v.contiguous() for v in second_moments] if spec.needs_second_moments else [],
                  0, tensor_name)
    plan = plan_tensor(spec, lambda: [chunk], be, models[0].numel(), tensor_name, thresholds)
    return run_plan(be, chunk, plan, out_dtype)


def run_plan(be: Backend, chunk: Chunk, plan: TensorPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """The fused pass over one chunk, with the NaN/Inf check the pass itself counted."""
    out, nonfinite = be.merge(chunk, plan, out_dtype)
    bad = nonfinite.nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        label = f"tensor {plan.tensor_name!r}" if plan.tensor_name else "the tensor"
        raise ValueError(f"task vector of model {i} for {label} contains {int(nonfinite[i])} "
                         f"NaN/Inf value(s); fastmerge refuses to merge them")
    return out


def magnitude_threshold(x: torch.Tensor, k: Optional[int] = None, *, density=None,
                        base: Optional[torch.Tensor] = None, backend: str = "auto") -> float:
    """T(k): the exact k-th largest |x - base| (keep j iff |t_j| >= T). Give k or density.

    Computed by radix selection on the chosen backend; equals a full sort's answer."""
    from .methods import top_k_count
    if (k is None) == (density is None):
        raise ValueError("give exactly one of k and density")
    check_inputs(base, [x])
    n = x.numel()
    if k is None:
        k = top_k_count(float(density), n)
    be = get_backend(backend, x.device)
    chunk = Chunk(base, [x.contiguous()])
    src = lambda: [chunk]  # noqa: E731
    hist = level0(be, 1, SCORE_MAGNITUDE, src)
    return select(be, hist, [(0, int(k))], SCORE_MAGNITUDE, src).thresholds[0]


def dare_mask(shape, density: float, *, seed: int = 0, tensor_name: str = "",
              model_index: int = 0, offset: int = 0, device=None) -> torch.Tensor:
    """The DARE keep-mask of docs/semantics.md: element j is kept iff word j & 3 of Philox4x32-10
    of counter j >> 2 is below floor(density * 2^32)."""
    return rng.dare_mask(shape, density, seed, tensor_name, model_index, offset, device)
