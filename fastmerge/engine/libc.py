"""The few C library calls the engine makes through ctypes (glibc / Linux), in one place.

``function(name, argtypes)`` is the named libc function with errno kept (``ctypes.get_errno``)
and its argument types set, or None where the C library lacks it (another OS, musl without
``mallopt``...): every caller treats None as "skip this optimisation". ctypes releases the GIL
during the call, which ``mmap.madvise`` for instance does not.
"""
from __future__ import annotations

import ctypes
from typing import Callable, Optional, Sequence


def function(name: str, argtypes: Sequence = ()) -> Optional[Callable]:
    try:
        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover
        return None
    f.argtypes = list(argtypes)
    return f
