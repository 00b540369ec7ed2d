"""Whether the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``): read from the
environment until the kernels load, then fixed, since triton reads it when a kernel is defined."""
from __future__ import annotations

import os
from typing import Optional

_at_load: Optional[bool] = None


def interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Whether the kernels run in the Triton interpreter (fixed when they were first loaded)."""
    return _at_load if _at_load is not None else interpret_env()


def mark_loaded() -> None:
    global _at_load
    if _at_load is None:
        _at_load = interpret_env()
