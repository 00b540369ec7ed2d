"""fastmerge: fused, memory-frugal model merging (TIES, DARE, breadcrumbs, task arithmetic,
consensus/TALL masks, LiNeS, OTA/FFG) with one API over torch, C++, CUDA and Triton kernels."""
from ._version import __version__
from . import ops  # noqa: F401  (registers the fastmerge:: torch.library ops)
from .api import dare_mask, magnitude_threshold, merge_tensors
from .backends import BACKEND_NAMES, available_backends
from .lines import block_index, lines_factor
from .methods import METHODS, MergeSpec, resolve_spec
from .engine import merge_checkpoints

__all__ = ["merge_tensors", "magnitude_threshold", "dare_mask", "lines_factor", "block_index",
           "available_backends", "resolve_spec", "merge_checkpoints", "MergeSpec", "METHODS", "BACKEND_NAMES",
           "__version__"]
