"""Module attributes loaded on first use (PEP 562), so importing a package does not import
torch (``fastmerge merge`` runs without it: fastmerge/pipeline/native.py)."""
from __future__ import annotations

import importlib
from typing import Callable, Optional


def attributes(package: str, where: dict, namespace: dict,
               before: Optional[Callable[[], None]] = None):
    """(``__getattr__``, ``__dir__``) for ``package``: name -> its value from the submodule
    ``where[name]``, cached in ``namespace``; ``before()`` runs first (e.g. registering ops)."""
    def getattr_(name):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if before is not None:
            before()
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        namespace[name] = value
        return value

    def dir_():
        return sorted(set(namespace) | set(where))
    return getattr_, dir_
