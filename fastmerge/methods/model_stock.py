"""model_stock: interpolate between the base and the models' average by their mutual angle.

As mergekit 0.1.5: with deltas d_i = X_i - B, cos = mean over pairs i<j of
clamp(d_i.d_j / max(|d_i| |d_j|, 1e-6), -1, 1), t = N cos / (1 + (N-1) cos) (0 where the
denominator is below 1e-6 in magnitude), out = t mean(X_i) + (1-t) B; over the whole tensor,
or with filter_wise over each vector along the last dim (a 1-D tensor is one vector).

Defined where mergekit is fragile (docs/semantics.md): t is not clamped, as in mergekit, so a
negative mean cosine extrapolates away from the average (t < 0) and a cosine near -1/(N-1)
gives a large |t|; zero deltas give cos = 0, t = 0, out = B.
"""
from __future__ import annotations

import math

from .core import Chunk, Combination, Job, Method, rows_view
from .lazy_torch import torch
from .schema import MethodSchema, Param

NORM_PRODUCT_FLOOR = 1e-6   # mergekit clamps |d_i| |d_j| to at least this
SINGULAR = 1e-6             # |1 + (N-1) cos| below this keeps the base


def stock_t(gram: torch.Tensor) -> torch.Tensor:
    """t from Gram matrices of the deltas, [..., N, N] float64 -> [...]."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    i, j = torch.triu_indices(n, n, offset=1)
    cos = gram[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=NORM_PRODUCT_FLOOR)
    cos = cos.clamp(-1, 1).mean(dim=-1)
    den = 1 + (n - 1) * cos
    singular = den.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos),
                       n * cos / torch.where(singular, torch.ones_like(den), den))


def stock_t_scalar(gram) -> float:
    """``stock_t`` of one [N, N] float64 Gram matrix (nested lists or numpy), without torch."""
    n = len(gram)
    norms = [math.sqrt(max(float(gram[i][i]), 0.0)) for i in range(n)]
    cos = [min(1.0, max(-1.0, float(gram[i][j]) / max(norms[i] * norms[j], NORM_PRODUCT_FLOOR)))
           for i in range(n) for j in range(i + 1, n)]
    cos = sum(cos) / len(cos)
    den = 1 + (n - 1) * cos
    return 0.0 if abs(den) < SINGULAR else n * cos / den


class ModelStock(Method):
    schema = MethodSchema(
        "model_stock", (Param("filter_wise", bool, False,
                              doc="one t per vector along the last dim instead of per tensor"),),
        base="required", min_models=2, paper="https://arxiv.org/abs/2403.19522")
    reductions = ("Gram matrix of the N deltas over the whole tensor (float64); filter_wise: "
                  "per row, row-local (no reduction across chunks)")

    def align(self, job: Job) -> int:
        return max(rows_view(job.shape)[1], 1) if job.params["filter_wise"] else 1

    def _deltas(self, chunk: Chunk) -> torch.Tensor:
        return torch.stack([m - chunk.base for m in chunk.models])

    def reduce(self, job: Job, chunks):
        if job.params["filter_wise"]:
            return None
        gram = 0
        for c in chunks:
            d = self._deltas(c).double()
            gram = gram + d @ d.T
        return float(stock_t(gram))

    def combination(self, job: Job) -> Combination | None:
        if job.params["filter_wise"]:
            return None   # one t per row
        n = job.n_models

        def coefficients(g):   # out = t mean(X_i) + (1 - t) B
            t = stock_t_scalar(g)
            return [t / n] * n + [1.0 - t]
        return Combination("tasks", coefficients)

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        mean = sum(chunk.models) / len(chunk.models)
        if not job.params["filter_wise"]:
            return stats * mean + (1 - stats) * chunk.base
        if chunk.numel == 0:
            return chunk.base
        cols = self.align(job)
        d = self._deltas(chunk).double().reshape(len(chunk.models), -1, cols)
        gram = torch.einsum("irc,jrc->rij", d, d)
        t = stock_t(gram).float()[:, None]
        base = chunk.base.reshape(-1, cols)
        return (t * mean.reshape(-1, cols) + (1 - t) * base).reshape(-1)


MODEL_STOCK = ModelStock()
