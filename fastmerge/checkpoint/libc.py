"""The few C library calls the engine makes through ctypes (glibc / Linux), in one place.

``function(name, argtypes)`` is the named libc function with errno kept (``ctypes.get_errno``)
and its argument types set, or None where the C library lacks it (another OS, musl without
``mallopt``...): every caller treats None as "skip this optimisation". ctypes releases the GIL
during the call, which ``mmap.madvise`` for instance does not.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Callable, Optional, Sequence


def function(name: str, argtypes: Sequence = ()) -> Optional[Callable]:
    try:
        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover
        return None
    f.argtypes = list(argtypes)
    return f


# renameat2(2) flags (linux/fs.h) and the "current directory" descriptor (fcntl.h)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_renameat2 = function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                    ctypes.c_char_p, ctypes.c_uint])


def renameat2(src, dst, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False where the C library or the file
    system cannot do it (the caller falls back); OSError otherwise (EEXIST: ``dst`` exists under
    RENAME_NOREPLACE; ENOENT: a path is missing)."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or flags not
        return False                                              # supported by this fs
    raise OSError(err, os.strerror(err), str(src), None, str(dst))
