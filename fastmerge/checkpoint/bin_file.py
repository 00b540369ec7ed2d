"""PyTorch ``.bin`` checkpoints (``pytorch_model.bin``, or shards with
``pytorch_model.bin.index.json``) as a source with Checkpoint's interface.

Each file is opened with ``torch.load(weights_only=True)``: torch's restricted unpickler, which
builds tensors, dicts and a few plain types and refuses any other global, so a pickle that
needs more than tensors is refused and never runs code. Zip-format files (what ``torch.save``
writes since torch 1.6) are loaded with ``mmap=True``: nothing but the pickle is read then,
and each chunk is copied out of the mapping when asked for, after which its pages are dropped
(``MADV_DONTNEED``), so a ``.bin`` input streams within the memory budget like a safetensors
one. The legacy (non-zip) format cannot be mapped: it is loaded whole into memory.

torch is imported only here, and only when a ``.bin`` input is opened.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import zipfile
from pathlib import Path
from typing import Optional

from . import libc
from .safetensors_file import (
    Checkpoint,
    CheckpointError,
    TensorInfo,
    model_roots,
    open_regular,
    quote,
    torch_dtypes,
)

BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_MADV_DONTNEED = 4
_MADVISE = libc.function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def bin_files_in(directory: Path) -> list:
    """The weight files of a ``.bin`` model directory, by name (index, single file, shards)."""
    if os.path.lexists(directory / BIN_INDEX) or os.path.lexists(directory / BIN_WEIGHTS):
        return [BIN_WEIGHTS]
    return sorted(p.name for p in directory.glob("pytorch_model-*.bin"))


def _refusal(exc: Exception) -> str:
    """The one line of torch's weights-only complaint that says what was refused."""
    for line in str(exc).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error: ")
        if line.startswith(("Unsupported", "Trying to", "Can only")):
            return quote(line.split(". ")[0], 120)[1:-1]
    return "it is not a plain dict of tensors"


class BinFile:
    """One ``.bin`` file: its tensors (mapped where the format allows), read chunk by chunk."""

    def __init__(self, path):
        import torch
        self.path = Path(path)
        with open_regular(self.path, "PyTorch checkpoint"):   # a FIFO would block torch.load
            pass
        self.mapped = zipfile.is_zipfile(self.path)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True,
                             mmap=self.mapped)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{self.path}: refused: the pickle needs more than tensors ({_refusal(exc)}); "
                f"fastmerge loads .bin files with torch.load(weights_only=True) and never runs "
                f"their code") from None
        except Exception as exc:   # torch raises many kinds for a bad file
            raise CheckpointError(f"{self.path}: not a readable PyTorch checkpoint "
                                  f"({type(exc).__name__}: {quote(str(exc), 120)[1:-1]})") \
                from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, not a dict of "
                                  f"tensor name -> tensor")
        to_st = {v: k for k, v in torch_dtypes().items()}
        self._t: dict = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, t in obj.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry {quote(name)} is a "
                                      f"{type(t).__name__}, not a tensor (a state dict "
                                      f"nested in another dict?)")
            if t.dtype not in to_st:
                raise CheckpointError(f"{self.path}, tensor {quote(name)}: unsupported dtype "
                                      f"{t.dtype}")
            self._t[name] = t
            nbytes = t.numel() * t.element_size()
            self.tensors[name] = TensorInfo(name, to_st[t.dtype], tuple(t.shape), 0, nbytes)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def _piece(self, name: str, start: int, stop: int):
        """Elements [start, stop) of the flattened tensor: a view of the mapping when the
        tensor is contiguous, else a copy of just the rows they lie in."""
        t = self._t[name]
        if t.is_contiguous():
            return t.reshape(-1)[start:stop]
        cols = t.numel() // t.shape[0]
        r0, r1 = start // cols, -(-stop // cols)
        return t[r0:r1].reshape(-1)[start - r0 * cols:stop - r0 * cols]

    def _drop_pages(self, name: str) -> None:
        """Return the pages just copied from the mapping (clean private pages: the next read
        faults them in from the page cache again), so they do not stay in the process RSS."""
        if not self.mapped or _MADVISE is None:
            return
        s = self._t[name].untyped_storage()
        lo, hi = s.data_ptr(), s.data_ptr() + s.nbytes()
        if hi <= lo:
            return
        lo -= lo % mmap.PAGESIZE
        _MADVISE(lo, hi - lo, _MADV_DONTNEED)

    def read(self, name: str, start: int = 0, stop: Optional[int] = None, out=None):
        """Elements [start, stop) of tensor ``name`` (flattened), copied into a buffer of its
        own (or ``out``, a uint8 buffer such as pinned staging)."""
        import torch
        info = self.tensors[name]
        stop = info.numel if stop is None else stop
        nbytes = (stop - start) * info.itemsize
        dtype = torch_dtypes()[info.st]
        dst = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        dst = dst.view(dtype) if nbytes else torch.empty(0, dtype=dtype)
        if nbytes:
            dst.copy_(self._piece(name, start, stop))
            self._drop_pages(name)
        return dst

    def map(self, name: str, start: int = 0, stop: Optional[int] = None):
        return self.read(name, start, stop)

    def view(self, name: str, start: int = 0, stop: Optional[int] = None) -> memoryview:
        import torch
        t = self.read(name, start, stop)
        return memoryview(t.view(torch.uint8).numpy()).toreadonly()

    def close(self) -> None:
        self._t = {}


class BinCheckpoint(Checkpoint):
    """A model directory of ``.bin`` weights: the same rules as a safetensors directory (every
    file resolves inside it; with an index, exactly the tensors it lists)."""
    copies_chunks = True   # each chunk a copy out of the mapping (pipeline/budget.py)

    def __init__(self, directory, label: str = ""):
        self.dir = Path(directory)
        self.label = label or str(directory)
        self._roots = model_roots(self.dir)
        index = self.dir / BIN_INDEX
        wmap = self._read_index(index) if os.path.lexists(index) else None
        files = sorted(set(wmap.values())) if wmap is not None else bin_files_in(self.dir)
        if not files:
            raise CheckpointError(f"{index}: weight_map lists no tensors")
        self._open_shards(files, index, wmap, BinFile)
        self._check_side_files()
