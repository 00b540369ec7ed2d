"""torch, imported on first attribute use.

The mergekit methods' modules are imported without torch by the config parser (their schemas)
and by ``fastmerge merge`` (their linear-combination coefficients); only their float32
references need torch, and they reach it through this name."""
from __future__ import annotations

import importlib


class _LazyTorch:
    def __getattr__(self, name):
        return getattr(importlib.import_module("torch"), name)


torch = _LazyTorch()
