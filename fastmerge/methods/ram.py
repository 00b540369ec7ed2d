"""ram and ramplus_tl: reinforced agent merging, as mergekit 0.1.5.

With task vectors t_i = X_i - B, nz_i = |t_i| > epsilon and c = sum_i nz_i per element:
- ram: out = B + sum_i t_i nz_i ([c = 1] + [c > 1] / c): a value only one model changed is
  taken whole, shared ones are averaged over the models that changed them. No reduction.
- ramplus_tl: model i's unique values are amplified by
  lambda_i = 1 + r clamp(S_i / max(U_i, epsilon), 0, alpha), with S_i / U_i its counts of
  shared / unique changed elements over the whole tensor.

Defined where mergekit is fragile (docs/semantics.md): a model with no unique element
(U_i = 0) gets lambda_i = 1 (it scales nothing); mergekit gives NaN there when epsilon = 0.
"""
from __future__ import annotations

from .core import Chunk, Job, Method
from .lazy_torch import torch
from .schema import MethodSchema, Param


def _epsilon() -> Param:
    return Param("epsilon", float, 1e-5, lo=0.0, doc="|t_i| above this counts as a change")


def _counts(chunk: Chunk, eps: float):
    tv = torch.stack([m - chunk.base for m in chunk.models])
    nz = tv.abs() > eps
    return tv, nz, nz.sum(0)


class Ram(Method):
    schema = MethodSchema("ram", (_epsilon(),), base="required", min_models=0,
                          paper="https://arxiv.org/abs/2601.13572")

    def amplification(self, job: Job, stats) -> torch.Tensor:
        return torch.ones(job.n_models)

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        if not chunk.models:
            return chunk.base.clone()
        tv, nz, count = _counts(chunk, job.params["epsilon"])
        lam = self.amplification(job, stats)[:, None]
        unique = (count == 1).float()
        shared = (count > 1).float() / count.clamp(min=1)
        return chunk.base + (tv * nz * (lam * unique + shared)).sum(0)


class RamPlusTL(Ram):
    schema = MethodSchema(
        "ramplus_tl", (Param("r", float, 0.1, doc="amplification strength"),
                       Param("alpha", float, 0.2, lo=0.0, doc="cap on the shared/unique ratio"),
                       _epsilon()),
        base="required", min_models=0, paper="https://arxiv.org/abs/2601.13572")
    reductions = "per model: counts of its shared and unique changed elements (integers)"

    def reduce(self, job: Job, chunks):
        counts = torch.zeros(job.n_models, 2, dtype=torch.int64)
        for c in chunks:
            if not c.models:
                continue
            _, nz, count = _counts(c, job.params["epsilon"])
            counts[:, 0] += (nz & (count > 1)).sum(1)
            counts[:, 1] += (nz & (count == 1)).sum(1)
        return counts

    def amplification(self, job: Job, stats) -> torch.Tensor:
        p = job.params
        shared, unique = stats[:, 0].double(), stats[:, 1].double()
        rho = shared / unique.clamp(min=p["epsilon"]).clamp(min=1e-300)
        lam = 1 + p["r"] * rho.clamp(0, p["alpha"])
        return torch.where(unique > 0, lam, torch.ones_like(lam)).float()


RAM = Ram()
RAMPLUS_TL = RamPlusTL()
