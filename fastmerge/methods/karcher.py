"""karcher: the Karcher (Riemannian) mean of the inputs' directions, as mergekit 0.1.5 defines it.

Every iterate of mergekit's fixed-point loop is a linear combination of the unit inputs u_i, so
the whole iteration runs on N coefficients with the Gram matrix G_ij = u_i.u_j from one
pre-pass over the chunks; the output is then sum_i c_i X_i, one per-element pass.

Defined where mergekit is fragile (docs/semantics.md):
- no convergence within max_iter: the last iterate is used, no error (as mergekit);
  max_iter = 0 gives the normalised mean direction.
- an input whose norm is <= tol adds nothing to the direction (its norm still counts in the
  length); all such inputs give zeros (as mergekit).
- a mean direction of norm < tol (e.g. an antipodal pair) starts from the first valid input.
- an input within tol of antipodal to the current mean adds no tangent (its log map is
  undefined); mergekit's float32 arithmetic gives the same for exact antipodes.
"""
from __future__ import annotations

import math

from .core import Chunk, Combination, Job, Method
from .lazy_torch import torch
from .schema import MethodSchema, Param


def _geodesic_step(mean, tangent, t_norm: float, length, tol: float):
    """The next iterate (torch or numpy coefficients alike): ``mean`` moved along ``tangent``
    by the exponential map, renormalised to unit ``length`` unless that is within tol of 0."""
    mean = math.cos(t_norm) * mean + math.sin(t_norm) * tangent / t_norm
    m_norm = length(mean)
    return mean / m_norm if m_norm > tol else mean


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """c with out = sum_i c_i X_i, from the float64 Gram matrix of the raw inputs X_i."""
    n = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    alphas = torch.full((n,), 1.0 / n, dtype=torch.float64)
    valid = norms > tol
    if not valid.any():
        return torch.zeros(n, dtype=torch.float64)
    safe = torch.where(valid, norms, torch.ones_like(norms))
    units = gram / safe[:, None] / safe[None, :]          # Gram of the unit inputs
    weights = torch.where(valid, alphas, torch.zeros_like(alphas))
    weights = weights / weights.sum()

    def length(c):
        return float((c @ units @ c).clamp(min=0).sqrt())

    mean = weights.clone()
    mean_norm = length(mean)
    if mean_norm < tol:
        mean = torch.zeros(n, dtype=torch.float64)
        mean[int(valid.nonzero()[0])] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1, 1)
        theta = torch.acos(dots)
        active = valid & (theta >= tol) & (math.pi - theta >= tol)
        scale = torch.where(active, weights * theta / torch.sin(theta).clamp(min=1e-300),
                            torch.zeros_like(theta))
        tangent = scale - scale.dot(dots) * mean   # sum_i scale_i (u_i - dot_i m)
        t_norm = length(tangent)
        if t_norm < tol:
            break
        mean = _geodesic_step(mean, tangent, t_norm, length, tol)
    return (alphas * norms).sum() * mean / safe


def karcher_coefficients_np(gram, max_iter: int, tol: float) -> list[float]:
    """``karcher_coefficients`` in numpy float64 (the torch-free path), same steps."""
    import numpy as np
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    norms = np.sqrt(np.clip(np.diag(g), 0, None))
    alphas = np.full(n, 1.0 / n)
    valid = norms > tol
    if not valid.any():
        return [0.0] * n
    safe = np.where(valid, norms, 1.0)
    units = g / safe[:, None] / safe[None, :]
    weights = np.where(valid, alphas, 0.0)
    weights = weights / weights.sum()

    def length(c):
        return math.sqrt(max(float(c @ units @ c), 0.0))

    mean = weights.copy()
    mean_norm = length(mean)
    if mean_norm < tol:
        mean = np.zeros(n)
        mean[int(np.flatnonzero(valid)[0])] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        dots = np.clip(units @ mean, -1, 1)
        theta = np.arccos(dots)
        active = valid & (theta >= tol) & (math.pi - theta >= tol)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(active, weights * theta / np.maximum(np.sin(theta), 1e-300), 0.0)
        tangent = scale - float(scale @ dots) * mean
        t_norm = length(tangent)
        if t_norm < tol:
            break
        mean = _geodesic_step(mean, tangent, t_norm, length, tol)
    return [float(x) for x in float((alphas * norms).sum()) * mean / safe]


class Karcher(Method):
    """out = (mean input norm) * Karcher mean of the unit inputs, equal weights 1/N; the base,
    when given, is one more input (mergekit appends it to the models)."""
    schema = MethodSchema(
        "karcher", (Param("max_iter", int, 10, lo=0, doc="fixed-point iterations at most"),
                    Param("tol", float, 1e-5, lo=0.0, open_lo=True,
                          doc="convergence and zero-norm tolerance")),
        base="input", min_models=1, paper="https://arxiv.org/abs/2603.04972")
    reductions = "Gram matrix X_i.X_j of the N inputs over the whole tensor (float64)"

    def reduce(self, job: Job, chunks):
        gram = None
        for c in chunks:
            x = torch.stack(c.models).double()
            gram = x @ x.T if gram is None else gram + x @ x.T
        if gram.shape[0] == 1:
            return None
        return karcher_coefficients(gram, job.params["max_iter"], job.params["tol"]).float()

    def combination(self, job: Job) -> Combination:
        if job.n_models == 1:   # one input: returned as it is
            return Combination(None, lambda g: [1.0])
        p = job.params
        return Combination("inputs", lambda g: karcher_coefficients_np(g, p["max_iter"],
                                                                       p["tol"]))

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        if stats is None:
            return chunk.models[0]  # one input: returned as it is
        return sum(float(c) * x for c, x in zip(stats, chunk.models, strict=True))


KARCHER = Karcher()
