"""The Triton backend: the three fastmerge primitives as Triton kernels.

This package imports without triton: triton (and the kernels) load lazily, the first time
``backend()`` or one of the ops is needed. It runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (how CI executes every kernel: the environment variable must be set
before triton is first imported, tests/conftest.py does that when no GPU is present).

The kernels are registered as ``torch.library.triton_op``s (``fastmerge::triton_score_histogram``,
``fastmerge::triton_model_stats``, ``fastmerge::triton_fused_merge``), launched through
``torch.library.wrap_triton``, so torch.compile can trace into them; their arguments and
semantics are those of the ``fastmerge::`` ops in ``fastmerge/ops.py``.

Limit: one launch handles at most ``MAX_MODELS`` (32) models (each model is its own kernel
argument, specialised on its dtype); more raise a ValueError naming the limit.
"""
from __future__ import annotations

import os
from typing import Optional

MAX_MODELS = 32

_interpret_at_import: Optional[bool] = None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    """Whether the kernels run in the Triton interpreter (fixed when they were first loaded)."""
    if _interpret_at_import is not None:
        return _interpret_at_import
    return _interpret_env()


def availability() -> tuple[bool, str]:
    """(available, why not): triton importable and a CUDA device or TRITON_INTERPRET=1."""
    err = _triton_error()
    if err:
        return False, err
    if interpreting():
        return True, ""
    import torch
    if torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device is visible to torch and TRITON_INTERPRET is not set"


def supports_device(dev_type: str) -> bool:
    """CUDA tensors on a GPU; CPU tensors only under the interpreter."""
    import torch
    if dev_type == "cpu":
        return interpreting()
    if dev_type == "cuda":
        return torch.cuda.is_available()
    return False


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _ops():
    """Load triton, the kernels and the torch.library registrations (once)."""
    global _interpret_at_import
    if _interpret_at_import is None:
        _interpret_at_import = _interpret_env()
    from . import _registry as ops_mod
    return ops_mod


def backend():
    """The ``fastmerge.backends.Backend`` whose three functions run the Triton kernels."""
    from ..backends import Backend
    o = _ops()
    return Backend("triton", o.score_histogram, o.model_stats, o.fused_merge)


def kernels():
    """The kernels module (for tests: Philox known-answer kernels)."""
    _ops()
    from . import _kernels
    return _kernels
