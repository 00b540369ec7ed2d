"""Backend "torch": the plain-torch kernels (kernels.py), on any device. They are written
independently of fastmerge/reference.py, which checks them."""


def backend():
    from .. import ops  # noqa: F401  (registers the kernels as the ops' fallback)
    from ..primitives import Backend
    from .kernels import fused_merge_torch, model_stats_torch, score_histogram_torch
    return Backend("torch", score_histogram_torch, model_stats_torch, fused_merge_torch)
