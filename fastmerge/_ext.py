"""Lenient loading of the compiled kernels (as torchao does): a missing or broken extension
is a warning and the backend is reported unavailable, never an import error of fastmerge."""
from __future__ import annotations

import importlib
import os
import warnings

_STATE: dict[str, tuple[bool, str]] = {}


def load(module: str) -> tuple[bool, str]:
    """Import ``fastmerge.<module>`` once; returns (loaded, reason-if-not)."""
    if module in _STATE:
        return _STATE[module]
    try:
        importlib.import_module(f"fastmerge.{module}")
        _STATE[module] = (True, "")
    except ImportError as exc:  # not built: the normal case for CUDA on a CPU machine
        _STATE[module] = (False, f"fastmerge.{module} is not built ({exc})")
    except Exception as exc:  # built but broken (ABI mismatch, missing symbol): say so
        reason = f"fastmerge.{module} failed to load: {exc!r}"
        if not os.environ.get("FASTMERGE_QUIET"):
            warnings.warn(reason + "; falling back to the plain-torch backend", RuntimeWarning)
        _STATE[module] = (False, reason)
    return _STATE[module]
