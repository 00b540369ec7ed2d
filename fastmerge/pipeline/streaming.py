"""Streaming pieces: the chunk loader (pinned staging + non_blocking copies on GPU) and a
one-ahead prefetching iterator; the budget -> chunk size and element ranges are in budget.py
(re-exported here)."""
from __future__ import annotations

from typing import Optional

import torch

from ..planning.selection import Chunk
from .budget import (  # noqa: F401
    FIXED_OVERHEAD,
    MIN_CHUNK_ELEMS,
    Chunking,
    element_ranges,
    plan_chunking,
    release_freed_memory_promptly,
    trim_freed_memory,
    work_bytes_per_element,
)
from .driver import prefetched  # noqa: F401  (re-exported)


class ChunkLoader:
    """Reads element ranges of one tensor from the base, the models and (optionally) the
    second-moment files into a Chunk on ``device``."""

    def __init__(self, base, models, preconditioners, device: str = "cpu"):
        self.base, self.models, self.pre = base, list(models), preconditioners
        self.device = torch.device(device)
        self._staging: Optional[torch.Tensor] = None
        self._copy_stream = None
        if self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)
            self._compute_stream = torch.cuda.current_stream(self.device)

    def _to_device(self, tensors: list) -> list:
        if self.device.type == "cpu":
            return tensors
        out = []
        with torch.cuda.stream(self._copy_stream):
            for t in tensors:
                g = t.to(self.device, non_blocking=True)
                g.record_stream(self._compute_stream)
                out.append(g)
        self._copy_stream.synchronize()   # staging can be reused; compute stream may use g
        return out

    def _read_all(self, reads: list) -> list:
        """reads: [(reader, name, start, stop)]; on GPU through one pinned staging buffer."""
        if self.device.type == "cpu":  # mapped, no copy (SafetensorsFile.map)
            return [r.map(n, s, e) for r, n, s, e in reads]
        sizes = [(e - s) * r.info(n).itemsize for r, n, s, e in reads]
        total = sum(sizes)
        if self._staging is None or self._staging.numel() < total:
            self._staging = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        host, pos = [], 0
        for (r, n, s, e), nb in zip(reads, sizes):
            host.append(r.read(n, s, e, out=self._staging[pos:pos + nb]))
            pos += nb
        return self._to_device(host)

    def load(self, name: str, start: int, stop: int, *, only_reference: bool = False,
             with_moments: bool = False, moment_names: Optional[list] = None,
             route: Optional[tuple] = None) -> Chunk:
        """``route``: (base (reader, tensor) or None, [(reader, tensor)]) when the inputs of
        output ``name`` are other tensors (a slice job); else ``name`` in every input."""
        base_src, model_srcs = route if route is not None else (
            (self.base, name) if self.base is not None else None,
            [(m, name) for m in self.models])
        reads = []
        if base_src is not None:
            reads.append((*base_src, start, stop))
        if not (only_reference and base_src is not None):
            reads += [(m, n, start, stop) for m, n in
                      (model_srcs[:1] if only_reference else model_srcs)]
        if with_moments and not only_reference:
            reads += [(p, mn, start, stop) for p, mn in zip(self.pre, moment_names)]
        got = self._read_all(reads)
        base = got.pop(0) if base_src is not None else None
        if only_reference:
            return Chunk(base, got[:1] if base is None else [base], [], start, name)
        n = len(model_srcs)
        return Chunk(base, got[:n], got[n:], start, name)
