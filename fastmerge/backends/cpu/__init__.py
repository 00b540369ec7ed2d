"""Backend "cpu": the C++ kernels of csrc/cpu, built twice over the same sources:
fastmerge._C registers them for the CPU dispatch key of the fastmerge:: ops (torch tensors),
fastmerge._core binds them over buffers without torch (what ``fastmerge merge`` runs). This
module imports neither torch nor an extension until asked."""
from __future__ import annotations

import os

from ... import _ext


def availability() -> tuple[bool, str]:
    import torch  # noqa: F401  (_C links libtorch: torch loads it first)
    return _ext.load("_C")


def backend():
    from ... import _C
    from ..primitives import dispatcher_backend
    be = dispatcher_backend("cpu", with_topk_window=True)
    be.score_histogram_windows = _C.score_histogram_windows
    return be


def core():
    """fastmerge._core, or None where it is not built."""
    # Idle OpenMP workers sleep instead of spinning (unless the user chose): the kernels'
    # workers spun on the 2 cores the reader and writer threads need (0.47B task_arithmetic:
    # user time 1.0-1.5 -> 0.3-0.45 s, wall 0.93-1.75 -> 0.72-1.6 s; ties no slower). Read
    # when libgomp starts, i.e. here, unless something loaded it before.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from ... import _core
        return _core
    except ImportError:
        return None


def output_cache_limit(backend, nbytes: int) -> int:
    """CPU backend: bytes of freed ``fused_merge`` outputs kept for reuse (a fresh 32 MiB
    output costs ~10 ms of page faults here; see csrc/cpu/output_cache.h). Returns the previous
    limit; a no-op returning 0 for the other backends."""
    if backend.name != "cpu":
        return 0
    from ... import _C
    return int(_C.set_output_cache_limit(int(nbytes)))

