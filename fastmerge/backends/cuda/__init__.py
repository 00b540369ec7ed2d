"""Backend "cuda": the CUDA kernels of csrc/cuda, built as fastmerge._cuda (only when asked
for: FASTMERGE_BUILD_CUDA=1), registered for the CUDA dispatch key of the fastmerge:: ops."""
from __future__ import annotations

from ... import _ext


def availability() -> tuple[bool, str]:
    import torch
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    return _ext.load("_cuda")


def backend():
    from ..primitives import dispatcher_backend
    return dispatcher_backend("cuda")
