"""fastmerge: fused, memory-frugal model merging (TIES, DARE, breadcrumbs, task arithmetic,
consensus/TALL masks, LiNeS, OTA/FFG) with one API over torch, C++, CUDA and Triton kernels.

The names below load on first use, so ``fastmerge merge`` can start without importing torch
(fastmerge/pipeline/native.py). Using any of them, or importing ``fastmerge.backends.ops``,
registers the ``torch.ops.fastmerge`` ops; importing fastmerge after torch registers them
right away."""
import sys

from . import _lazy
from ._version import __version__

_LAZY = {"merge_tensors": "api", "magnitude_threshold": "api", "dare_mask": "api",
         "available_backends": "backends", "BACKEND_NAMES": "backends",
         "block_index": "methods.lines", "lines_factor": "methods.lines",
         "METHODS": "methods", "MergeSpec": "methods", "resolve_spec": "methods",
         "merge_checkpoints": "pipeline.torch_entry", "sweep": "pipeline.sweep"}

__all__ = ["merge_tensors", "magnitude_threshold", "dare_mask", "lines_factor", "block_index",
           "available_backends", "resolve_spec", "merge_checkpoints", "MergeSpec", "METHODS",
           "BACKEND_NAMES", "sweep", "__version__"]


def _register_ops():
    from .backends import ops  # noqa: F401  (registers the fastmerge:: torch.library ops)


__getattr__, __dir__ = _lazy.attributes(__name__, _LAZY, globals(), before=_register_ops)


if "torch" in sys.modules:  # torch is loaded already: register the ops as before
    _register_ops()
