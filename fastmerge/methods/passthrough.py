"""passthrough: one input copied, optionally times a per-model ``scale`` (mergekit 0.1.5).

No reduction; the base, if configured, is not an input. ``scale`` takes conditions like any
per-model parameter (e.g. 0 for some tensors of a frankenmerge), resolved by the config layer.
"""
from __future__ import annotations

from .core import Chunk, Combination, Job, Method
from .lazy_torch import torch
from .schema import MethodSchema, Param


class Passthrough(Method):
    schema = MethodSchema(
        "passthrough", (Param("scale", float, None, scope="per_model", nullable=True,
                              doc="multiply the input by this (none: copy)"),),
        base="ignored", min_models=1, max_models=1)

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        scale = job.params["scale"][0]
        return chunk.models[0] if scale is None else chunk.models[0] * scale

    def combination(self, job: Job) -> Combination:
        scale = job.params["scale"][0]
        return Combination(None, lambda g: [1.0 if scale is None else scale])


PASSTHROUGH = Passthrough()
