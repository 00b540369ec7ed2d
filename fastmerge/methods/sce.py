"""sce: select (top-variance elements), calculate (per-model weights), erase (sign conflicts).

As mergekit 0.1.5, with task vectors t_i = X_i - B:
1. select_topk < 1: keep the elements whose variance across the models (population variance)
   is among the top k = int(count_nonzero(var) * select_topk) of the whole tensor; every t_i
   keeps the same elements (none when k = 0 or select_topk <= 0).
2. weights s_i = mean(t_i^2) over the whole (masked) tensor, w_i = s_i / sum s; uniform 1/N
   when sum s < 1e-6 (mergekit's absolute guard, kept).
3. out = B + sum_i w_i e_i t_i / max(sum_i w_i e_i, 1e-6), e_i = [sign t_i = majority sign of
   sum_i t_i] (>= 0 elects +).

Deliberate deviation (docs/semantics.md): elements tied with the k-th largest variance are all
kept (mergekit's topk keeps an arbitrary subset of the ties).
"""
from __future__ import annotations

from .core import GATHERED, Chunk, Job, Method, gather_values, order_statistics
from .lazy_torch import torch
from .schema import MethodSchema, Param

WEIGHT_SUM_FLOOR = 1e-6


def variance(chunk: Chunk) -> torch.Tensor:
    return torch.var(torch.stack([m - chunk.base for m in chunk.models]), dim=0, unbiased=False)


class Sce(Method):
    schema = MethodSchema(
        "sce", (Param("select_topk", float, 1.0, lo=0.0, hi=1.0,
                      doc="fraction of the non-zero-variance elements kept"),
                Param("int8_mask", bool, False, doc="mergekit memory option; no effect")),
        base="required", min_models=0, paper="https://arxiv.org/abs/2408.07990")
    passes = 2
    reductions = ("select_topk < 1: count of non-zero variances and the k-th largest variance "
                  "over the whole tensor (a selection, like ties' threshold); then per model "
                  "the sum of masked t_i^2 (float64)")

    def _threshold(self, job: Job, chunks):
        """Variance at or above which elements are kept; None keeps all, inf keeps none."""
        frac = job.params["select_topk"]
        if frac >= 1:
            return None
        if frac <= 0:
            return float("inf")
        # every variance gathered (4 bytes per element, state_bytes), selected in place
        var = gather_values(job.numel, chunks, variance)
        k = int(int(torch.count_nonzero(var)) * frac)
        if k == 0:
            return float("inf")
        return float(order_statistics(var, [var.numel() - k])[0])

    def state_bytes(self, job: Job) -> tuple[int, int]:
        # select_topk in (0, 1): every variance, selected in place
        if not 0 < job.params["select_topk"] < 1:
            return 0, 0
        return GATHERED * job.numel, GATHERED * job.numel

    def work_bytes(self, job: Job) -> int | None:
        # the N + 1 float32 inputs of a chunk, then per element of a sub-block at most: the
        # masked task vectors as float32 and float64 (reduce: 12 N) or the task vectors with
        # their weights (apply: 8 N), the variance/majority rows and the float32 output
        n = job.n_models
        return 4 * (n + 1) + 12 * n + 16

    def _masked(self, chunk: Chunk, threshold):
        # in place where the values are the same bits: the scratch per element is what the
        # memory budget counts (chunk_work_bytes)
        tv = torch.stack([m - chunk.base for m in chunk.models])
        if threshold is None:
            return tv
        return tv.mul_(torch.var(tv, dim=0, unbiased=False) >= threshold)

    def reduce(self, job: Job, chunks):
        n = job.n_models
        if n == 0:
            return None
        threshold = self._threshold(job, chunks)
        sq = torch.zeros(n, dtype=torch.float64)
        for c in chunks:
            sq += self._masked(c, threshold).double().square_().sum(dim=1)
        s = sq / max(job.numel, 1)
        total = float(s.sum())
        weights = torch.full((n,), 1.0 / n) if abs(total) < WEIGHT_SUM_FLOOR else (s / total)
        return threshold, weights.float()

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        if stats is None:
            return chunk.base.clone()
        threshold, weights = stats
        tv = self._masked(chunk, threshold)
        majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
        ew = tv.sign().eq_(majority).mul_(weights[:, None])   # w_i e_i
        return chunk.base + tv.mul_(ew).sum(0) / ew.sum(0).clamp(min=WEIGHT_SUM_FLOOR)


SCE = Sce()
