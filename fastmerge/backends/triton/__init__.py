"""The Triton backend: the three fastmerge primitives as Triton kernels.

This package imports without triton: triton (and the kernels) load lazily, the first time
``backend()`` or one of the ops is needed. It runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (how CI executes every kernel: the environment variable must be set
before triton is first imported, tests/conftest.py does that when no GPU is present).

The kernels are registered as ``torch.library.triton_op``s (``fastmerge::triton_score_histogram``,
``fastmerge::triton_model_stats``, ``fastmerge::triton_fused_merge``), launched through
``torch.library.wrap_triton``, so torch.compile can trace into them; their arguments and
semantics are those of the ``fastmerge::`` ops in ``fastmerge/backends/ops.py``.

Kernels (fastmerge/backends/triton/_kernels.py):
- ``_fused_merge_kernel``: ONE kernel for every method, specialised by constexpr flags
  (COMBINE, SCORE, ELECT, ELECT_ON, NORMALIZE, HAS_BASE, HAS_V, N); per-model modes (keep all,
  band, none, DARE) are runtime scalars from iparams. The N models loop is unrolled
  (``tl.static_range``); TIES and consensus loop over the models 2-3 times in one program
  (the re-reads of the block hit L1/L2). DARE draws Philox4x32-10 in-kernel (``tl.umulhi`` on
  uint32 words, bit-identical to fastmerge/methods/rng.py, tested on the Random123 vectors).
- ``_score_histogram_kernel``: grid (blocks, targets); level 0/1 digits of the float32 score
  bits; global int64/float64 atomics, pre-aggregated per block on a GPU at level 0 (sort by
  bin + segmented scans, one atomic per distinct bin). Magnitude sums are exact (one bin's
  |t| share their exponent), Fisher sums are exact integer limbs: no result depends on the
  order of the atomics.
- ``_model_stats_kernel``: per-block float64 partial sums, added up by torch in a fixed order.
Calls over views at an odd element offset, or of a size not divisible by 16, run the merge and
the histograms as head / body / tail launches so the body keeps vector loads (``_peel.py``).
All indices are int64 (tensors > 2^31 elements); all arithmetic float32 after the loads, each
operation rounded on its own (no FMA contraction, ``div_rn``). Launches run on the device of
their tensors.
``python -m fastmerge.backends.triton.compile_check`` compiles them for sm_90 without a GPU.

Limit: one launch handles at most ``MAX_MODELS`` (32) models (each model is its own kernel
argument, specialised on its dtype); the ops raise a ValueError beyond that, and the Backend
functions fall back (with a RuntimeWarning) to the plain-torch kernels on the same device.
"""
from __future__ import annotations

from typing import Optional

from ._mode import interpreting, mark_loaded

__all__ = ["MAX_MODELS", "availability", "backend", "default_device", "interpreting", "kernels",
           "supports_device"]

MAX_MODELS = 32


def _triton_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


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
    mark_loaded()
    from . import _registry as ops_mod
    return ops_mod


def backend():
    """The ``Backend`` whose three functions run the Triton kernels."""
    from ..primitives import Backend
    o = _ops()
    return Backend("triton", o.score_histogram, o.model_stats, o.fused_merge)


def kernels():
    """The kernels module (for tests: Philox known-answer kernels)."""
    _ops()
    from . import _kernels
    return _kernels
