"""della and della_linear: magnitude-ranked random pruning of task vectors, as mergekit 0.1.5.

Each task vector d_i = X_i - B is pruned row by row (vectors along dim 1; a 1-D tensor is one
row): element ranks r = 1..n by ascending |d| within its row get keep probability
p = (density - eps) + 2 eps (r - 1) / (n - 1), so larger entries survive more often. With
rescale the kept entries are scaled by |d_i|_1 / |kept|_1 over the whole tensor. Then
d'_i = w_i * pruned d_i, combined by a TIES sign election (della) or summed (della_linear),
optionally normalised, times lambda, added to the base.

The draws are fastmerge's (semantics v2 generator, fastmerge.methods.rng), so they match mergekit in
distribution, not draw for draw: element j (row-major index in the whole tensor) of model i
(0-based among the non-base models) is kept iff word ``j & 3`` of
Philox(key(seed, tensor name, i), counter j >> 2) < floor(p_j * 2^32), with p_j computed in
float64 as (density - eps) + (r - 1) * (2 eps / (n - 1)). The mask is a pure function of
(seed, name, i, j), so chunks of whole rows reproduce it exactly.

Defined where mergekit is fragile (docs/semantics.md):
- density >= 1 keeps the task vector unchanged and unrescaled; density <= 0 drops it (mergekit).
- otherwise density - |eps| > 0 and density + |eps| < 1 are required (mergekit raises for
  the same, and its negative-epsilon probabilities above 1 crash torch.bernoulli);
  eps = 0 draws every element with p = density (DARE's mask drawn per element).
- ties in |d| rank by column (a stable sort; mergekit's argsort order is unspecified).
- a tensor of 3 or more dims ranks within each dim-0 slice, flattened (mergekit ranks along
  dim 1 alone; LLM weights have at most 2).
- a row of length 1 gets p = density (mergekit divides 0 by 0 and crashes).
- ranks are exact (mergekit ranks bf16 inputs in bf16, where ranks above 256 round).
- the L1 rescale is skipped only when the kept L1 norm is 0 (DARE's rule in fastmerge;
  mergekit also skips it when either norm is below 1e-7).
"""
from __future__ import annotations

import math

from . import rng
from .core import Chunk, Job, Method
from .lazy_torch import torch
from .schema import MethodSchema, Param


def _check_della(params: dict, n: int) -> None:
    for i, (d, e) in enumerate(zip(params["density"], params["epsilon"], strict=True)):
        if 0 < d < 1 and not (d - abs(e) > 0 and d + abs(e) < 1):
            raise ValueError(f"della: epsilon[{i}] = {e} must keep density +- epsilon inside "
                             f"(0, 1) for density {d}")


def _schema(name: str, normalize: bool) -> MethodSchema:
    return MethodSchema(
        name, (Param("weight", float, scope="per_model", doc="task vector weight"),
               Param("density", float, 1.0, scope="per_model", lo=0.0, hi=1.0,
                     doc="mean keep probability"),
               Param("epsilon", float, 0.15, scope="per_model",
                     doc="keep probabilities span density +- epsilon by magnitude rank"),
               Param("lambda", float, 1.0, doc="scale of the merged task vector"),
               Param("rescale", bool, True, doc="L1-rescale each pruned task vector"),
               Param("normalize", bool, normalize, doc="divide by the (elected) weight sum"),
               Param("int8_mask", bool, False, doc="mergekit memory option; no effect")),
        base="required", min_models=0, random=True, check=_check_della,
        paper="https://arxiv.org/abs/2406.11617")


def row_length(shape) -> int:
    """Length of a della row: dim 1 for 2-D and more, the whole tensor for 0-/1-D."""
    if len(shape) < 2:
        return max(1, math.prod(shape))
    return math.prod(shape[1:])


def keep_thresholds(delta_rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Integer keep thresholds floor(p * 2^32) per element of [rows, n] float32 task values."""
    n = delta_rows.shape[1]
    if n == 1 or epsilon == 0:
        p = torch.full(delta_rows.shape, density, dtype=torch.float64)
    else:
        order = torch.argsort(delta_rows.abs(), dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(n).expand_as(order).contiguous())
        p = (density - epsilon) + ranks.double() * (2 * epsilon / (n - 1))
    return torch.floor(p.clamp(0, 1) * 4294967296.0).to(torch.int64)


def della_mask(delta: torch.Tensor, offset: int, row_len: int, density: float, epsilon: float,
               seed: int, name: str, model: int) -> torch.Tensor:
    """Boolean keep mask of a flat chunk of whole rows starting at element ``offset``."""
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool)
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    thresholds = keep_thresholds(delta.reshape(-1, row_len), density, epsilon).reshape(-1)
    words = rng.philox_uniform_u32(rng.dare_key(seed, name, model), offset, delta.numel())
    return words < thresholds


class Della(Method):
    reductions = ("per model: L1 norm of the task vector and of its kept part over the whole "
                  "tensor (2 float64 sums; the reference recomputes the mask in the apply "
                  "pass, the kernel of backends/cpu/della.py keeps it as bits)")

    def __init__(self, name: str, elect: bool, normalize: bool):
        self.schema = _schema(name, normalize)
        self.elect = elect

    def align(self, job: Job) -> int:
        return row_length(job.shape)

    def _pruned(self, job: Job, chunk: Chunk):
        """[(model, task vector, keep mask)] of the chunk."""
        p = job.params
        for i, m in enumerate(chunk.models):
            d = m - chunk.base
            mask = della_mask(d, chunk.offset, self.align(job), p["density"][i], p["epsilon"][i],
                              job.seed, job.name, i)
            yield i, d, mask

    def reduce(self, job: Job, chunks):
        n = len(job.params["weight"])
        l1 = torch.zeros(n, 2, dtype=torch.float64)
        if not job.params["rescale"]:
            return torch.ones(n)
        for c in chunks:
            for i, d, mask in self._pruned(job, c):
                a = d.abs().double()
                l1[i, 0] += a.sum()
                l1[i, 1] += (a * mask).sum()
        scale = torch.where(l1[:, 1] > 0, l1[:, 0] / l1[:, 1].clamp(min=1e-300),
                            torch.ones(n, dtype=torch.float64))
        dens = torch.tensor(job.params["density"])
        return torch.where(dens >= 1, torch.ones_like(scale), scale).float()

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        p = job.params
        if not chunk.models:
            return chunk.base.clone()
        weighted = torch.stack([p["weight"][i] * (d * mask * stats[i])
                                for i, d, mask in self._pruned(job, chunk)])
        w = torch.tensor(p["weight"], dtype=torch.float32)[:, None]
        if self.elect:
            majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
            agree = (weighted.sign() == majority).float()
            mixed = (weighted * agree).sum(0)
            divisor = (w * agree).sum(0)
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        else:
            mixed = weighted.sum(0)
            divisor = w.sum(0).expand_as(mixed)
            divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
        if p["normalize"]:
            mixed = mixed / divisor
        return chunk.base + p["lambda"] * mixed


DELLA = Della("della", elect=True, normalize=True)
DELLA_LINEAR = Della("della_linear", elect=False, normalize=False)
