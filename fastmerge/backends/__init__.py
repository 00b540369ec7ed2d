"""The one dispatch point: ``backend="auto"|"torch"|"cpu"|"cuda"|"triton"``.

A backend is three primitives with the signatures of the ``fastmerge::`` ops (ops.py):
``score_histogram``, ``model_stats`` and ``fused_merge``, and optionally ``topk_window``. The selection and planning code
(selection.py, plan.py) is shared; only these kernels differ per backend.

- ``torch``: the plain-torch kernels of ops.py (reference semantics, any device).
- ``cpu``: the C++ extension (fastmerge._C), registered for the CPU dispatch key.
- ``cuda``: the CUDA extension (fastmerge._cuda), registered for the CUDA dispatch key.
- ``triton``: the Triton kernels (fastmerge.backends.triton); GPU, or CPU under TRITON_INTERPRET=1.
- ``auto``: the first available backend of ``AUTO_PREFERENCE`` for the tensors' device
  (``FASTMERGE_BACKEND`` overrides it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import _ext
from ..planning.selection import Chunk, ChunkSource
from . import ops

BACKEND_NAMES = ("auto", "torch", "cpu", "cuda", "triton")
# Filled only from measurements (benchmarks/gpu.py prints the table it measured). No GPU has
# run them yet, so for CUDA tensors auto prefers the GPU backend whose kernels the conformance
# tests have executed (Triton, run in CI under TRITON_INTERPRET=1) over the CUDA kernels, which
# CI only compiles. On CPU the C++ kernels are measured (README) and executed by the tests.
AUTO_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


@dataclass
class Backend:
    name: str
    score_histogram: Callable
    model_stats: Callable
    fused_merge: Callable
    # one-pass exact top-k of one chunk (fastmerge::topk_window); only the CPU kernels have a
    # fast one, elsewhere the radix selection (two histogram passes) runs
    topk_window: Optional[Callable] = None

    # The shared planning code calls these wrappers.
    def histogram_into(self, chunk: Chunk, score: int, targets: torch.Tensor, level: int,
                       counts: torch.Tensor, sums: torch.Tensor) -> None:
        """Add one chunk's histograms into ``counts``/``sums`` (on the chunk's device)."""
        self.score_histogram(chunk.base, list(chunk.models), list(chunk.second_moments), score,
                             targets, level, counts, sums)

    def stats(self, source: ChunkSource, score: int, fparams, iparams, power: float):
        out = None
        for chunk in source():
            dev = chunk.models[0].device
            part = torch.zeros(len(chunk.models), 3, dtype=torch.float64, device=dev)
            self.model_stats(chunk.base, list(chunk.models), list(chunk.second_moments), score,
                             fparams.to(dev), iparams.to(dev), float(power), chunk.offset, part)
            out = part.cpu() if out is None else out + part.cpu()
        return out

    def merge(self, chunk: Chunk, plan, out_dtype: torch.dtype):
        dev = chunk.models[0].device
        plan = plan.on(dev)
        nonfinite = torch.zeros(len(chunk.models), dtype=torch.int64, device=dev)
        out = self.fused_merge(chunk.base, list(chunk.models), list(chunk.second_moments),
                               plan.fparams, plan.iparams, *plan.op_args(), chunk.offset,
                               out_dtype, nonfinite)
        return out, nonfinite.cpu()


def _torch_backend() -> Backend:
    return Backend("torch", ops.score_histogram_torch, ops.model_stats_torch,
                   ops.fused_merge_torch)


def _dispatcher_backend(name: str) -> Backend:
    o = torch.ops.fastmerge
    return Backend(name, o.score_histogram, o.model_stats, o.fused_merge,
                   o.topk_window if name == "cpu" else None)


def availability(name: str) -> tuple[bool, str]:
    """(available, why not) for a concrete backend name."""
    if name == "torch":
        return True, ""
    if name == "cpu":
        return _ext.load("_C")
    if name == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
        return _ext.load("_cuda")
    if name == "triton":
        try:
            from . import triton as triton_kernels
        except ImportError as exc:
            return False, f"triton backend unavailable: {exc}"
        return triton_kernels.availability()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def available_backends() -> dict[str, str]:
    """Each concrete backend and "ok" or the reason it cannot run here."""
    out = {}
    for name in BACKEND_NAMES[1:]:
        ok, why = availability(name)
        out[name] = "ok" if ok else why
    return out


def _device_type(device) -> str:
    return torch.device(device).type


def get_backend(name: str, device) -> Backend:
    """The backend to run on ``device``; raises ValueError saying why one cannot run."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    dev = _device_type(device)
    if name == "auto":
        name = os.environ.get("FASTMERGE_BACKEND", "auto")
        if name == "auto":
            for cand in AUTO_PREFERENCE.get(dev, ("torch",)):
                if availability(cand)[0] and _supports(cand, dev):
                    name = cand
                    break
        return get_backend(name, device)
    ok, why = availability(name)
    if not ok:
        raise ValueError(f"backend {name!r} is not available: {why}")
    if not _supports(name, dev):
        raise ValueError(f"backend {name!r} cannot run on {dev} tensors; move the tensors or "
                         f"pick another backend ({', '.join(BACKEND_NAMES)})")
    if name == "torch":
        return _torch_backend()
    if name == "triton":
        from . import triton as triton_kernels
        return triton_kernels.backend()
    return _dispatcher_backend(name)


def _supports(name: str, dev: str) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return dev == "cpu"
    if name == "cuda":
        return dev == "cuda"
    if name == "triton":
        from . import triton as triton_kernels
        return triton_kernels.supports_device(dev)
    return False


def output_cache_limit(backend: Backend, nbytes: int) -> int:
    """CPU backend: bytes of freed ``fused_merge`` outputs kept for reuse (a fresh 32 MiB
    output costs ~10 ms of page faults here; see csrc/cpu/output_cache.h). Returns the previous
    limit; a no-op returning 0 for the other backends."""
    return _cpu_limit(backend, "set_output_cache_limit", nbytes)


def dare_bits_limit(backend: Backend, nbytes: int) -> int:
    """CPU backend: bytes of DARE keep bits the statistics pass may leave for the merge
    (csrc/cpu/dare_bits.h). Returns the previous limit; 0 and nothing done elsewhere."""
    return _cpu_limit(backend, "set_dare_bits_limit", nbytes)


def _cpu_limit(backend: Backend, setter: str, nbytes: int) -> int:
    if backend.name != "cpu":
        return 0
    from .. import _C
    return int(getattr(_C, setter)(int(nbytes)))
