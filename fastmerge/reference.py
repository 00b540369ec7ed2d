"""The pure-torch reference: every method of docs/semantics.md, written to be read, not fast.

Masks (thresholds, bands, DARE, FFG scores) always come from the float32 task vectors, as
docs/semantics.md requires; the arithmetic after them runs in ``dtype`` (float32 by default,
float64 on request, which is what the conformance tests compare every backend against).

Shapes: ``base`` is any shape S (or None when the models are task vectors / for ``linear``);
``models`` is a list of N tensors of shape S; ``second_moments`` a list of N tensors of shape
S (curvature methods only). The result has shape S and dtype ``out_dtype``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .methods import MergeSpec, band_counts, rng, top_k_count
from .methods.moments import finite_non_negative


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} contains {bad} NaN/Inf value(s); fastmerge refuses to merge them")


def task_vectors(base: Optional[torch.Tensor], models: Sequence[torch.Tensor],
                 dtype=torch.float32, tensor_name: str = "") -> torch.Tensor:
    """t_i = m_i - b in ``dtype`` (models taken as task vectors when base is None), [N, *S]."""
    label = f"tensor {tensor_name!r}" if tensor_name else "tensor"
    t = torch.stack([m.to(dtype) for m in models])
    if base is not None:
        t = t - base.to(dtype)
    for i in range(len(models)):
        check_finite(t[i], f"task vector of model {i} for {label}")
    return t


def check_second_moments(second_moments, n_models: int, shape, tensor_name: str) -> None:
    """Second moments (Adam exp_avg_sq): one finite, non-negative tensor per model, shape S."""
    if second_moments is None or len(second_moments) != n_models:
        got = "none" if second_moments is None else len(second_moments)
        raise ValueError(f"tensor {tensor_name!r}: the curvature methods need one second-moment "
                         f"tensor per model ({n_models}); got {got}")
    for i, v in enumerate(second_moments):
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"tensor {tensor_name!r}: second moments of model {i} have shape "
                             f"{tuple(v.shape)}, the weights {tuple(shape)}")
        if finite_non_negative(v):
            continue
        check_finite(v, f"second moments of model {i} for tensor {tensor_name!r}")
        if (v < 0).any():
            raise ValueError(f"second moments of model {i} for tensor {tensor_name!r} are "
                             f"negative somewhere; exp_avg_sq is never negative")


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest entry (1-based) of ``values``, by a full sort: obviously exact."""
    flat = values.reshape(-1)
    return torch.sort(flat, descending=True).values[k - 1].item()


def magnitude_threshold(score: torch.Tensor, k: int) -> float:
    """T(k): keep j iff score[j] >= T(k). k >= n keeps all (0.0), k <= 0 keeps nothing (inf)."""
    n = score.numel()
    if k <= 0:
        return float("inf")
    if k >= n:
        return 0.0
    return kth_largest(score, k)


def selection_score(spec: MergeSpec, t32: torch.Tensor, v: Optional[torch.Tensor]) -> torch.Tensor:
    """The float32 score the top-k selects on: |t| or (FFG) t*t*v."""
    if spec.score == "fisher":
        return (t32 * t32) * v.to(torch.float32)
    return t32.abs()


def thresholds_for(spec: MergeSpec, i: int, score: torch.Tensor) -> tuple[float, float]:
    """(lo, hi) for model i: keep j iff lo <= score[j] < hi (hi = inf means no upper bound)."""
    n = score.numel()
    d = spec.densities[i]
    if spec.sparsifier in ("topk", "fisher"):
        return magnitude_threshold(score, top_k_count(d, n)), float("inf")
    if spec.sparsifier == "band":
        if top_k_count(d, n) == 0:
            return float("inf"), float("inf")
        n_top, k_lo = band_counts(d, spec.gammas[i], n)
        hi = float("inf") if n_top == 0 else kth_largest(score, n_top)
        return magnitude_threshold(score, k_lo), hi
    return 0.0, float("inf")


def keep_masks(spec: MergeSpec, t32: torch.Tensor, second_moments, tensor_name: str,
               offset: int = 0, thresholds=None) -> tuple[torch.Tensor, list]:
    """Boolean keep masks [N, *S] from the float32 task vectors, and the (lo, hi) used."""
    masks, used = [], []
    for i in range(spec.n_models):
        if spec.sparsifier == "none":
            masks.append(torch.ones_like(t32[i], dtype=torch.bool))
            used.append((0.0, float("inf")))
            continue
        if spec.sparsifier == "dare":
            masks.append(rng.dare_mask(t32[i].shape, spec.densities[i], spec.seed, tensor_name, i,
                                       offset=offset, device=t32.device))
            used.append((0.0, float("inf")))
            continue
        v = second_moments[i] if second_moments is not None else None
        score = selection_score(spec, t32[i], v)
        lo, hi = thresholds[i] if thresholds is not None else thresholds_for(spec, i, score)
        masks.append((score >= lo) & ((score < hi) | (hi == float("inf"))))
        used.append((lo, hi))
    return torch.stack(masks), used


def rescale_factors(spec: MergeSpec, t: torch.Tensor, keep: torch.Tensor) -> list[float]:
    """Per-model factor on the kept values: 1, 1/d (inverse_density) or ||t||_1/||s(t)||_1 (l1)."""
    out = []
    for i in range(spec.n_models):
        d = spec.densities[i]
        if spec.rescale == "inverse_density":
            out.append(1.0 / d if d > 0 else 0.0)
        elif spec.rescale == "l1":
            total = t[i].abs().double().sum().item()
            kept = (t[i].abs().double() * keep[i]).sum().item()
            out.append(total / kept if kept > 0 else 1.0)
        else:
            out.append(1.0)
    return out


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x)


def ties_combine(spec: MergeSpec, u: torch.Tensor, s: torch.Tensor, w: torch.Tensor, aux: dict):
    """Sign election + disjoint merge. u: weighted [N, *S], s: unweighted, w: weights [N, 1..]."""
    e = u if spec.elect_on == "weighted" else s
    if spec.election == "sum":
        vote = e.sum(0)
        aux["elect_sum"] = vote.double()
        aux["elect_mag"] = e.abs().sum(0).double()
    else:
        vote = _sign(e).sum(0)
    elected = torch.where(vote >= 0, 1.0, -1.0).to(u.dtype)
    agree = _sign(e) == elected
    merged = (u * agree).sum(0)
    divisor = torch.ones_like(merged)
    if spec.normalize is True:
        divisor = (w * agree).sum(0)
    elif spec.normalize == "count":
        divisor = agree.sum(0).to(u.dtype).clamp(min=1)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    aux["term_mag"] = (u.abs() * agree).sum(0).double() / divisor.abs().double()
    return merged / divisor


def sum_combine(spec: MergeSpec, u: torch.Tensor, w: torch.Tensor, aux: dict):
    merged = u.sum(0)
    divisor = 1.0
    if spec.normalize is True:
        divisor = w.sum().item()
    elif spec.normalize == "count":
        divisor = float(spec.n_models)
    if divisor == 0:
        divisor = 1.0
    aux["term_mag"] = u.abs().sum(0).double() / abs(divisor)
    return merged / divisor


def consensus_keep(spec: MergeSpec, t: torch.Tensor, t_mtl: torch.Tensor, aux: dict):
    """TALL masks: M_i = |t_i| > l_i |t_mtl - t_i| (strict), keep where sum_i M_i >= k."""
    lam = torch.tensor(spec.consensus_lambdas, dtype=t.dtype, device=t.device)
    lam = lam.reshape((-1,) + (1,) * (t.dim() - 1))
    lhs, rhs = t.abs(), lam * (t_mtl - t).abs()
    votes = (lhs > rhs).sum(0)
    scale = t.abs() + lam * (t.abs() + aux["term_mag"].to(t.dtype))
    aux["consensus_margin"] = ((lhs - rhs).abs().double()
                               / scale.double().clamp(min=1e-300)).amin(0)
    return votes >= spec.consensus_k


def ota_weights(spec: MergeSpec, second_moments, w: torch.Tensor, dtype,
                p_scales: Optional[Sequence[float]] = None) -> torch.Tensor:
    """W_i = w_i * (P_i + eps), P_i = v_i^p, optionally / (mean(P_i) + eps) per tensor.

    ``p_scales`` gives 1/(mean(P_i) + eps) precomputed over the whole tensor (chunked merges)."""
    out = []
    for i in range(spec.n_models):
        p = second_moments[i].to(dtype).clamp(min=0) ** spec.power
        if p_scales is not None:
            p = p * p_scales[i]
        elif spec.ota_normalize == "global":
            p = p / (p.double().mean().item() + spec.eps)
        out.append(w[i] * (p + spec.eps))
    return torch.stack(out)


def combine(spec: MergeSpec, base, t, s, w, second_moments=None, p_scales=None,
            aux: Optional[dict] = None) -> torch.Tensor:
    """Everything after the masks: combine the sparsified task vectors s [N, *S] (weights w
    [N, 1, ..]) into the merged vector and return b + lambda * L * merged, in t's dtype."""
    aux = {} if aux is None else aux
    u = w * s
    if spec.combine == "sum":
        merged = sum_combine(spec, u, w, aux)
    elif spec.combine == "ties":
        merged = ties_combine(spec, u, s, w, aux)
    elif spec.combine in ("consensus_sum", "consensus_ties"):
        if spec.combine == "consensus_sum":
            t_mtl = sum_combine(spec, u, w, aux)
        else:
            t_mtl = ties_combine(spec, u, s, w, aux)
        merged = consensus_keep(spec, t, t_mtl, aux) * t_mtl
    elif spec.combine == "ota":
        big_w = ota_weights(spec, second_moments, w, t.dtype, p_scales)
        merged = (big_w * s).sum(0) / big_w.sum(0)
        aux["term_mag"] = (big_w * s).abs().sum(0).double() / big_w.sum(0).abs().double()
    else:  # pragma: no cover - the method table only names the combines above
        raise AssertionError(spec.combine)
    b = base.to(t.dtype) if base is not None else torch.zeros_like(merged)
    aux["base_abs"] = b.abs().double()
    aux["term_mag"] = aux["term_mag"] * abs(spec.scale)
    return b + spec.scale * merged


def linear_combine(spec: MergeSpec, m: torch.Tensor, w: torch.Tensor, aux: dict) -> torch.Tensor:
    """linear: sum w_i m_i / sum w_i (no division when normalize is False)."""
    total = w.sum().item() if spec.normalize else 1.0
    total = total if total != 0 else 1.0
    aux["term_mag"] = (w * m).abs().sum(0).double() / abs(total)
    aux["base_abs"] = torch.zeros(m.shape[1:], dtype=torch.float64, device=m.device)
    return (w * m).sum(0) / total


def merge(base: Optional[torch.Tensor], models: Sequence[torch.Tensor], spec: MergeSpec, *,
          tensor_name: str = "", second_moments=None, dtype=torch.float32, out_dtype=None,
          offset: int = 0, thresholds=None, return_aux: bool = False):
    """Merge one tensor by docs/semantics.md. ``thresholds`` overrides the per-model (lo, hi)
    (model scope); ``offset`` is the global index of the first element (DARE counters) when
    merging a chunk."""
    if len(models) != spec.n_models:
        raise ValueError(f"spec is for {spec.n_models} models, got {len(models)} tensors")
    if out_dtype is None:
        out_dtype = (base if base is not None else models[0]).dtype
    aux: dict = {}
    w = torch.tensor(spec.weights, dtype=dtype, device=models[0].device)
    w = w.reshape((-1,) + (1,) * models[0].dim())

    if spec.combine == "linear":
        out = linear_combine(spec, task_vectors(None, models, dtype, tensor_name), w, aux)
        return (out.to(out_dtype), aux) if return_aux else out.to(out_dtype)

    t32 = task_vectors(base, models, torch.float32, tensor_name)
    t = t32 if dtype == torch.float32 else task_vectors(base, models, dtype, tensor_name)
    if spec.needs_second_moments:
        check_second_moments(second_moments, spec.n_models, t32.shape[1:], tensor_name)
    keep, used = keep_masks(spec, t32, second_moments, tensor_name, offset, thresholds)
    factors = rescale_factors(spec, t, keep)
    r = torch.tensor(factors, dtype=dtype, device=t.device).reshape(w.shape)
    aux.update(keep=keep, thresholds=used, rescale=factors)
    out = combine(spec, base, t, t * keep * r, w, second_moments, aux=aux)
    return (out.to(out_dtype), aux) if return_aux else out.to(out_dtype)
