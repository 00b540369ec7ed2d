"""arcee_fusion: keep the model's changes where they matter most, as mergekit 0.1.5.

importance = |P - B| * KL(softmax(P) || softmax(B)) per vector along the last dim (each
softmax + 1e-8; a 1-D tensor is one vector); threshold = median + 1.5 (q3 - q1) of the
importance over the whole tensor, quantile q at sorted index floor(q (n - 1)) (no
interpolation); out = B + (P - B) [importance >= threshold].

Defined where mergekit is fragile (docs/semantics.md): the quantiles are always exact order
statistics; mergekit estimates them from 10^6 random samples (with replacement) when the tensor
has more than 10^6 elements, so its mask there is random.
"""
from __future__ import annotations

from .core import GATHERED, Chunk, Job, Method, gather_values, order_statistics, rows_view
from .lazy_torch import torch
from .schema import MethodSchema

SOFTMAX_EPS = 1e-8


def importance(base_rows: torch.Tensor, model_rows: torch.Tensor) -> torch.Tensor:
    """Per-element importance of [rows, n] float32 inputs."""
    p = torch.softmax(model_rows, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base_rows, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model_rows - base_rows).abs() * kl


class ArceeFusion(Method):
    schema = MethodSchema("arcee_fusion", (), base="required", min_models=1, max_models=1,
                          paper="https://arcee.ai")
    reductions = ("order statistics (25%, 50%, 75%) of the per-element importance over the "
                  "whole tensor (a selection, like ties' threshold); the importance itself is "
                  "row-local (softmax and KL along the last dim)")

    def align(self, job: Job) -> int:
        return max(rows_view(job.shape)[1], 1)

    def _importance(self, job: Job, chunk: Chunk) -> torch.Tensor:
        cols = self.align(job)
        return importance(chunk.base.reshape(-1, cols),
                          chunk.models[0].reshape(-1, cols)).reshape(-1)

    def reduce(self, job: Job, chunks):
        # every importance gathered (4 bytes per element, state_bytes), selected in place
        imp = gather_values(job.numel, chunks, lambda c: self._importance(job, c))
        n = imp.numel()
        if n == 0:
            return None
        q1, med, q3 = order_statistics(imp, ((n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4))
        return float(med + 1.5 * (q3 - q1))

    def state_bytes(self, job: Job) -> tuple[int, int]:
        return GATHERED * job.numel, GATHERED * job.numel

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        if chunk.numel == 0:
            return chunk.base
        keep = self._importance(job, chunk) >= stats
        return chunk.base + (chunk.models[0] - chunk.base) * keep


ARCEE_FUSION = ArceeFusion()
