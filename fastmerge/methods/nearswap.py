"""nearswap: take the model's value where it is within t of the base, as mergekit 0.1.5.

Per element: w = clamp(t / max(|B - X|, 1e-6), 0, 1), out = w X + (1 - w) B. No reduction.
"""
from __future__ import annotations

from .core import Chunk, Job, Method
from .lazy_torch import torch
from .schema import MethodSchema, Param

DIFF_FLOOR = 1e-6


class NearSwap(Method):
    schema = MethodSchema(
        "nearswap", (Param("t", float, lo=0.0,
                           doc="distance below which the model's value is taken whole"),),
        base="required", min_models=1, max_models=1,
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        base, model = chunk.base, chunk.models[0]
        w = (job.params["t"] / (base - model).abs().clamp(min=DIFF_FLOOR)).clamp(0, 1)
        return w * model + (1 - w) * base


NEARSWAP = NearSwap()
