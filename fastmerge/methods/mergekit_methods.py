"""mergekit 0.1.5's own methods that fastmerge's task-vector engine does not cover.

Kept apart from ``METHODS`` (``fastmerge.methods``) until the config parser and pipeline are
integrated: nothing here changes how the existing methods resolve. Each entry is a
:class:`~fastmerge.methods.core.Method` with its schema, float32 reference and the reductions
its pre-pass needs. mergekit's ``linear``, ``task_arithmetic``, ``ties``, ``dare_*`` and
``breadcrumbs*`` are fastmerge methods already.
"""
from __future__ import annotations

from .arcee_fusion import ARCEE_FUSION
from .core import Method
from .della import DELLA, DELLA_LINEAR
from .karcher import KARCHER
from .model_stock import MODEL_STOCK
from .nearswap import NEARSWAP
from .passthrough import PASSTHROUGH
from .ram import RAM, RAMPLUS_TL
from .sce import SCE
from .slerp import MULTISLERP, NUSLERP, SLERP

MERGEKIT_METHODS: dict[str, Method] = {m.name: m for m in (
    SLERP, NUSLERP, MULTISLERP, KARCHER, MODEL_STOCK, DELLA, DELLA_LINEAR, SCE, NEARSWAP,
    ARCEE_FUSION, RAM, RAMPLUS_TL, PASSTHROUGH)}


def mergekit_method(name: str) -> Method:
    """The reference of a mergekit-only method, or one line listing those there are."""
    try:
        return MERGEKIT_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown mergekit method {name!r}; these are: "
                         f"{', '.join(sorted(MERGEKIT_METHODS))}") from None
