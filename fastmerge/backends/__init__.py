"""The backend registry: one table, name -> (availability, device types, loader), read by
``get_backend`` / ``auto``, the CLI (``--backend``, ``fastmerge backends``) and the tests.

A backend provides the primitives of the ``fastmerge::`` ops (ops.py): ``score_histogram``,
``model_stats`` and ``fused_merge``, and optionally ``topk_window``, as a ``Backend``
(primitives.py). Selection and planning (fastmerge/planning) are shared; only these kernels
differ per backend. Each backend lives in its own folder (pytorch/, cpu/, cuda/, triton/) and
none of them imports this module back.

This module imports neither torch nor a backend: ``fastmerge merge`` reads the registry on the
torch-free path, and a backend is loaded only when asked for.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

from .. import _lazy


@dataclass(frozen=True)
class BackendSpec:
    """One row of the registry."""
    name: str
    devices: tuple[str, ...]                      # device types it can run on at all
    availability: Callable[[], tuple[bool, str]]  # (usable here, why not)
    load: Callable[[], object]                    # the Backend (imports its kernels)
    # narrower than ``devices`` at run time (Triton runs CPU tensors only when interpreting)
    supports: Optional[Callable[[str], bool]] = None

    def runs_on(self, device_type: str) -> bool:
        if device_type not in self.devices:
            return False
        return self.supports(device_type) if self.supports is not None else True


def _torch_availability():
    return True, ""


def _deferred(module: str, attr: str) -> Callable:
    """Calls ``<module>.<attr>`` (a backend folder's function), imported on the first call."""
    def call(*args):
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)(*args)
    return call


REGISTRY: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", ("cpu", "cuda"), _torch_availability, _deferred("pytorch", "backend")),
    BackendSpec("cpu", ("cpu",), _deferred("cpu", "availability"), _deferred("cpu", "backend")),
    BackendSpec("cuda", ("cuda",), _deferred("cuda", "availability"),
                _deferred("cuda", "backend")),
    BackendSpec("triton", ("cuda", "cpu"), _deferred("triton", "availability"),
                _deferred("triton", "backend"), _deferred("triton", "supports_device")),
)}
BACKEND_NAMES = ("auto",) + tuple(REGISTRY)
# Filled only from measurements (benchmarks/gpu.py prints the table it measured). No GPU has
# run them yet, so for CUDA tensors auto prefers the GPU backend whose kernels the conformance
# tests have executed (Triton, run in CI under TRITON_INTERPRET=1) over the CUDA kernels, which
# CI only compiles. On CPU the C++ kernels are measured (README) and executed by the tests.
AUTO_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# The Backend class needs torch: loaded on first use
__getattr__, __dir__ = _lazy.attributes(__name__, {"Backend": "primitives"}, globals())


def _spec(name: str) -> BackendSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    return REGISTRY[name]


def availability(name: str) -> tuple[bool, str]:
    """(available, why not) for a concrete backend name."""
    return _spec(name).availability()


def available_backends() -> dict[str, str]:
    """Each concrete backend and "ok" or the reason it cannot run here."""
    out = {}
    for name in REGISTRY:
        ok, why = availability(name)
        out[name] = "ok" if ok else why
    return out


def _device_type(device) -> str:
    import torch
    return torch.device(device).type


def resolve_name(name: str, device) -> str:
    """The concrete backend ``name`` means on ``device`` ("auto": ``FASTMERGE_BACKEND``, else
    the first available of ``AUTO_PREFERENCE`` that runs there)."""
    if name != "auto":
        _spec(name)
        return name
    name = os.environ.get("FASTMERGE_BACKEND", "auto")
    if name != "auto":
        return resolve_name(name, device)
    dev = _device_type(device)
    for cand in AUTO_PREFERENCE.get(dev, ("torch",)):
        if availability(cand)[0] and REGISTRY[cand].runs_on(dev):
            return cand
    return "torch"


def get_backend(name: str, device):
    """The Backend to run on ``device``; raises ValueError saying why one cannot run."""
    name = resolve_name(name, device)
    spec, dev = REGISTRY[name], _device_type(device)
    ok, why = spec.availability()
    if not ok:
        raise ValueError(f"backend {name!r} is not available: {why}")
    if not spec.runs_on(dev):
        raise ValueError(f"backend {name!r} cannot run on {dev} tensors; move the tensors or "
                         f"pick another backend ({', '.join(BACKEND_NAMES)})")
    return spec.load()
