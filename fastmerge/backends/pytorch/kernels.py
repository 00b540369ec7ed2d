"""The plain-torch kernels of the ``fastmerge::`` ops (backend "torch"): any device, registered
as the ops' CompositeExplicitAutograd fallback by fastmerge/backends/ops.py. Their semantics are
the ops' documentation there. They share no code with fastmerge/reference.py, the oracle that
checks them (tests/test_ops.py, tests/test_layers.py)."""
from __future__ import annotations

from typing import Optional

import torch

from ...abi import (
    ELECT_SUM,
    ELECT_WEIGHTED,
    F_CONSENSUS_LAMBDA,
    F_HI,
    F_LO,
    F_OTA_SCALE,
    F_RESCALE,
    F_WEIGHT,
    MODE_DARE,
    MODE_KEEP_ALL,
    MODE_KEEP_NONE,
    NORMALIZE_COUNT,
    NORMALIZE_NONE,
    NORMALIZE_WEIGHTS,
    NUM_BINS,
    RADIX_BITS,
    SCORE_FISHER,
    SCORE_MAGNITUDE,
)
from ...methods import rng
from ...methods.kernel_params import COMBINE_IDS


def _task_vectors(base, models) -> torch.Tensor:
    t = torch.stack([m.to(torch.float32) for m in models])
    return t - base.to(torch.float32) if base is not None else t


def _score(t: torch.Tensor, v: Optional[torch.Tensor], score: int) -> torch.Tensor:
    """The float32 selection score, sign cleared (-0.0 scores as 0): |t| or |(t*t)*v|."""
    return ((t * t) * v.to(torch.float32)).abs() if score == SCORE_FISHER else t.abs()


def _score_bits(t: torch.Tensor, v: Optional[torch.Tensor], score: int) -> torch.Tensor:
    """The score's float32 bit pattern as int64 (non-negative floats order like their bits)."""
    return _score(t, v, score).contiguous().view(torch.int32).to(torch.int64)


def score_histogram_torch(base, models, second_moments, score, targets, level, counts, sums):
    """Level 0: bin = top 16 bits of the score, per model (targets[:, 0]).
    Level 1: among elements whose top 16 bits equal targets[:, 1], bin = low 16 bits."""
    for row, (i, prefix) in enumerate(targets.tolist()):
        t = _task_vectors(base, [models[i]])[0].reshape(-1)
        v = second_moments[i].reshape(-1) if score == SCORE_FISHER else None
        bits = _score_bits(t, v, score)
        mag = t.abs().to(torch.float64)
        if level == 0:
            bins = bits >> RADIX_BITS
        else:
            sel = (bits >> RADIX_BITS) == prefix
            bins, mag = bits[sel] & (NUM_BINS - 1), mag[sel]
        counts[row] += torch.bincount(bins, minlength=NUM_BINS).to(counts.device)
        sums[row] += torch.bincount(bins, weights=mag, minlength=NUM_BINS).to(sums.device)


def keep_masks_packed(t, second_moments, score, fparams, iparams, offset) -> torch.Tensor:
    """Boolean keep masks [N, *S] from the packed per-model parameters."""
    masks = []
    for i, (mode, key, thr) in enumerate(iparams.tolist()):
        if mode == MODE_KEEP_ALL:
            masks.append(torch.ones_like(t[i], dtype=torch.bool))
        elif mode == MODE_KEEP_NONE:
            masks.append(torch.zeros_like(t[i], dtype=torch.bool))
        elif mode == MODE_DARE:
            r = rng.philox_uniform_u32(key & rng.MASK64, offset, t[i].numel(), t.device)
            masks.append((r < thr).reshape(t[i].shape))
        else:
            v = second_moments[i] if score == SCORE_FISHER else None
            s = _score(t[i], v, score)
            lo, hi = fparams[i, F_LO].item(), fparams[i, F_HI].item()
            masks.append((s >= lo) & ((s < hi) | (hi == float("inf"))))
    return torch.stack(masks)


def model_stats_torch(base, models, second_moments, score, fparams, iparams, power, offset, out):
    t = _task_vectors(base, models)
    keep = keep_masks_packed(t, second_moments, score, fparams, iparams, offset)
    mag = t.abs().to(torch.float64).reshape(len(models), -1)
    out[:, 0] += mag.sum(1).to(out.device)
    out[:, 1] += (mag * keep.reshape(len(models), -1)).sum(1).to(out.device)
    if second_moments:
        p = torch.stack([v.to(torch.float32).clamp(min=0) ** power for v in second_moments])
        out[:, 2] += p.to(torch.float64).reshape(len(models), -1).sum(1).to(out.device)


def _weighted_sum(u, w, normalize: int, n: int):
    """sum_i u_i, divided by sum w_i (NORMALIZE_WEIGHTS) or n (NORMALIZE_COUNT); a zero divisor
    divides by 1."""
    div = 1.0
    if normalize == NORMALIZE_WEIGHTS:
        div = w.sum().item()
    elif normalize == NORMALIZE_COUNT:
        div = float(n)
    return u.sum(0) / (div if div != 0 else 1.0)


def _elected_sum(u, s, w, elect: int, elect_on: int, normalize: int):
    """TIES: per element, the sign the votes elect (a tie elects +), then the sum of the terms
    that agree with it, divided by their weights (or count) where normalize asks."""
    votes = u if elect_on == ELECT_WEIGHTED else s
    signs = torch.sign(votes)
    total = votes.sum(0) if elect == ELECT_SUM else signs.sum(0)
    agree = signs == torch.where(total >= 0, 1.0, -1.0).to(u.dtype)
    merged = (u * agree).sum(0)
    if normalize == NORMALIZE_NONE:
        return merged / torch.ones_like(merged)
    div = (w * agree).sum(0) if normalize == NORMALIZE_WEIGHTS else \
        agree.sum(0).to(u.dtype).clamp(min=1)
    return merged / torch.where(div == 0, torch.ones_like(div), div)


def _curvature_weighted(s, w, second_moments, ota_scale, power: float, eps: float):
    """OTA: sum_i W_i s_i / sum_i W_i with W_i = w_i (v_i^power * ota_scale_i + eps)."""
    v = torch.stack([m.to(torch.float32) for m in second_moments]).clamp(min=0) ** power
    big_w = w * (v * ota_scale + eps)
    return (big_w * s).sum(0) / big_w.sum(0)


def _combine(combine: int, t, s, w, fparams, second_moments, elect, elect_on, normalize,
             consensus_k, power, eps):
    """The merged task vector of the sparsified, rescaled task vectors ``s`` [N, *S]."""
    n, u = t.shape[0], w * s
    if combine == COMBINE_IDS["sum"]:
        return _weighted_sum(u, w, normalize, n)
    if combine == COMBINE_IDS["ties"]:
        return _elected_sum(u, s, w, elect, elect_on, normalize)
    if combine in (COMBINE_IDS["consensus_sum"], COMBINE_IDS["consensus_ties"]):
        mtl = _weighted_sum(u, w, normalize, n) if combine == COMBINE_IDS["consensus_sum"] \
            else _elected_sum(u, s, w, elect, elect_on, normalize)
        lam = fparams[:, F_CONSENSUS_LAMBDA].to(torch.float32).reshape(w.shape)
        # TALL mask: keep where at least k models have |t_i| > lambda_i |mtl - t_i|
        agreeing = (t.abs() > lam * (mtl - t).abs()).sum(0)
        return (agreeing >= consensus_k) * mtl
    if combine == COMBINE_IDS["ota"]:
        ota_scale = fparams[:, F_OTA_SCALE].to(torch.float32).reshape(w.shape)
        return _curvature_weighted(s, w, second_moments, ota_scale, power, eps)
    raise ValueError(f"unknown combine id {combine}")


def fused_merge_torch(base, models, second_moments, fparams, iparams, combine, score, elect,
                      elect_on, normalize, consensus_k, scale, power, eps, offset, out_dtype,
                      nonfinite):
    n = len(models)
    w = fparams[:, F_WEIGHT].to(torch.float32).reshape((-1,) + (1,) * models[0].dim())
    if combine == COMBINE_IDS["linear"]:
        m = torch.stack([x.to(torch.float32) for x in models])
        nonfinite += (~torch.isfinite(m)).reshape(n, -1).sum(1).to(nonfinite.device)
        total = w.sum().item() if normalize != NORMALIZE_NONE else 1.0
        return ((w * m).sum(0) / (total if total != 0 else 1.0)).to(out_dtype)
    t = _task_vectors(base, models)
    nonfinite += (~torch.isfinite(t)).reshape(n, -1).sum(1).to(nonfinite.device)
    keep = keep_masks_packed(t, second_moments, score, fparams, iparams, offset)
    r = fparams[:, F_RESCALE].to(torch.float32).reshape(w.shape)
    merged = _combine(combine, t, t * keep * r, w, fparams, second_moments, elect, elect_on,
                      normalize, consensus_k, power, eps)
    b = base.to(torch.float32) if base is not None else torch.zeros_like(merged)
    return (b + scale * merged).to(out_dtype)


def topk_window_torch(base, models, requests, l1):
    """Exact k-th largest |t_i| for each request row (model i, k) with 1 <= k <= numel.

    Returns (thresholds int64 [R]: the float32 bit pattern of T(k), or -1 where a kernel's
    sampled window missed, which this one never does; kept_l1 float64 [R]: sum of |t_i| >=
    T(k); total_l1 float64 [N]: sum |t_i|; nonfinite int64 [N]: NaN/Inf task-vector values).
    The L1 sums are zeros unless ``l1``. The C++ kernel (csrc/cpu/select.cpp) reads the inputs
    once where the radix selection reads them twice."""
    n = len(models)
    rows = requests.tolist()
    thr = torch.empty(len(rows), dtype=torch.int64)
    kept = torch.zeros(len(rows), dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    bad = torch.zeros(n, dtype=torch.int64)
    mags = {}
    for i in sorted({int(r[0]) for r in rows}):
        s = _score(_task_vectors(base, [models[i]])[0].reshape(-1), None, SCORE_MAGNITUDE)
        bad[i] = int((~torch.isfinite(s)).sum())
        mags[i] = s
        if l1:
            total[i] = s.to(torch.float64).sum().cpu()
    for r, (i, k) in enumerate(rows):
        s = mags[int(i)]
        t = torch.topk(s, int(k), sorted=False).values.min()
        thr[r] = int(t.reshape(1).view(torch.int32).item())
        if l1:
            kept[r] = s[s >= t].to(torch.float64).sum().cpu()
    return thr, kept, total, bad
