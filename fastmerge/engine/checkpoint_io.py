"""Reading safetensors checkpoints lazily, with the header checked before anything is trusted.

``SafetensorsFile`` parses and validates the header itself (JSON, dtypes, shapes, offsets
against the file size, overlaps) and gives element ranges of one tensor two ways:

- ``read``: ``os.preadv`` into a buffer it owns (or the caller's pinned staging buffer);
- ``map``: a private mapping of just that range, its pages populated up front
  (``MADV_POPULATE_READ``), unmapped when the tensor is freed. No copy out of the page cache:
  on the 0.2B benchmark preset that copy was ~0.3 s of CPU per merge on this 2-core VM.
  (The one thing it gives up: an input truncated by another process between the populate and
  the kernel's read ends the process with SIGBUS instead of raising; file systems that cannot
  map files fall back to ``read``.)

Either way, what a chunk costs in memory is its own bytes, only while it is alive: there is no
mapping of whole files (whose touched pages would stay in the process RSS). ``Checkpoint`` is a
model directory: its shards, the name -> file map, config and tokenizer files.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import libc

# safetensors dtype codes -> bytes per element (the dtypes a checkpoint may hold). This module
# reads headers and maps bytes without torch (engine/native.py merges without importing it);
# the torch dtypes come from torch_dtypes() once something asks for a tensor.
ST_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4,
            "I64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MERGEABLE_ST = ("BF16", "F16", "F32")
# the config's dtype names (engine/config.py) -> safetensors codes
NAME_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
                "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "U16": "uint16", "U32": "uint32", "U64": "uint64"}


def dtype_label(st: str) -> str:
    """How errors name a safetensors dtype code: torch's name ("torch.bfloat16")."""
    return f"torch.{_TORCH_NAMES.get(st, st)}"


@functools.lru_cache(maxsize=None)
def torch_dtypes() -> dict:
    """safetensors code -> torch dtype (imports torch)."""
    import torch
    return {k: getattr(torch, v) for k, v in _TORCH_NAMES.items() if hasattr(torch, v)}


def __getattr__(name):  # ST_DTYPES, TORCH_TO_ST, MERGEABLE: torch dtypes, built on first use
    if name == "ST_DTYPES":
        return torch_dtypes()
    if name == "TORCH_TO_ST":
        return {v: k for k, v in torch_dtypes().items()}
    if name == "MERGEABLE":
        return tuple(torch_dtypes()[k] for k in MERGEABLE_ST)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

MAX_HEADER = 100 * 1024 * 1024   # the safetensors crate's own limit
_MAX_IO = 1 << 30                # bytes per preadv call
_MADV_POPULATE_READ = 22         # Linux >= 5.14: fault the pages in now (reads them if needed)


_MADVISE = libc.function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def _populate(mm: mmap.mmap) -> int:
    """Fault a mapping's pages in now (reading them from disk if needed); 0 or an errno.
    Through ctypes, which lets go of the GIL while the kernel reads (mmap.madvise holds it, which
    would stall the writer and the main thread behind a cold read). Kernels without
    MADV_POPULATE_READ (< 5.14) get a readahead hint instead."""
    if _MADVISE is None:  # pragma: no cover
        mm.madvise(mmap.MADV_WILLNEED)
        return 0
    view = (ctypes.c_char * len(mm)).from_buffer(mm)
    try:
        if _MADVISE(ctypes.addressof(view), len(mm), _MADV_POPULATE_READ) == 0:
            return 0
        err = ctypes.get_errno()
    finally:
        del view
    if err in (errno.EINVAL, errno.ENOSYS):
        mm.madvise(mmap.MADV_WILLNEED)
        return 0
    return err


class CheckpointError(ValueError):
    """Bad input: a message naming the file (and the tensor) at fault."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    st: str      # safetensors dtype code ("BF16", ...)
    shape: tuple
    begin: int   # absolute file offset of the first byte
    end: int

    @property
    def dtype(self):
        """The torch dtype (imports torch)."""
        return torch_dtypes()[self.st]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ST_SIZES[self.st]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One .safetensors file: validated header, ranged reads."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open ({exc.strerror})") from None
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self._fd: Optional[int] = None
        self._parse_header()

    def _fail(self, why: str, tensor: Optional[str] = None):
        where = f"{self.path}" + (f", tensor {tensor!r}" if tensor else "")
        raise CheckpointError(f"{where}: {why} (truncated or corrupt safetensors file?)")

    def _parse_header(self):
        if self.size < 8:
            self._fail(f"file is {self.size} bytes, shorter than the 8-byte header length")
        with open(self.path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > MAX_HEADER or 8 + hlen > self.size:
                self._fail(f"header length {hlen} exceeds the file size {self.size}")
            raw = f.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._fail(f"header is not valid JSON ({exc})")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        data_start, data_size = 8 + hlen, self.size - 8 - hlen
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            self._fail("__metadata__ is not an object")
        self.metadata = meta
        spans = []
        for name, e in header.items():
            if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                self._fail("entry must have exactly dtype, shape and data_offsets", name)
            if e["dtype"] not in ST_SIZES:
                self._fail(f"unknown dtype {e['dtype']!r}", name)
            shape, offs = e["shape"], e["data_offsets"]
            if not isinstance(shape, list) or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                self._fail(f"bad shape {shape!r}", name)
            if (not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                    or not 0 <= offs[0] <= offs[1]):
                self._fail(f"bad data_offsets {offs!r}", name)
            dt = e["dtype"]
            want = math.prod(shape) * ST_SIZES[dt]
            if offs[1] - offs[0] != want:
                self._fail(f"data_offsets {offs} span {offs[1] - offs[0]} bytes but shape "
                           f"{shape} of {e['dtype']} needs {want}", name)
            if offs[1] > data_size:
                self._fail(f"data_offsets {offs} run past the end of the data "
                           f"({data_size} bytes)", name)
            spans.append((offs[0], offs[1], name))
            self.tensors[name] = TensorInfo(name, dt, tuple(shape), data_start + offs[0],
                                            data_start + offs[1])
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                self._fail(f"data overlaps tensor {n0!r}", n1)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    # -------------------------------------------------------------- reading
    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, name: str, start: int = 0, stop: Optional[int] = None,
             out=None):
        """Elements [start, stop) of tensor ``name`` (flattened) as a 1-D tensor of its dtype.

        ``out``: a uint8 buffer (e.g. pinned) of at least the needed bytes to read into."""
        import torch
        info = self.tensors[name]
        stop = info.numel if stop is None else stop
        isz = info.itemsize
        nbytes = (stop - start) * isz
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        if nbytes:
            self._pread(name, memoryview(buf.numpy()).cast("B"), info.begin + start * isz)
        return buf.view(info.dtype) if nbytes else torch.empty(0, dtype=info.dtype)

    def _pread(self, name: str, mv: memoryview, pos: int) -> None:
        """Fill ``mv`` from file offset ``pos`` (tensor ``name``'s bytes)."""
        fd, done = self._fileno(), 0
        while done < len(mv):
            got = os.preadv(fd, [mv[done:done + _MAX_IO]], pos + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}, tensor {name!r}: file ended early while "
                                      f"reading (truncated?)")
            done += got

    def _mapping(self, name: str, start: int, stop: int):
        """(mmap, offset of element ``start`` in it, bytes) of a private (copy-on-write),
        populated mapping of elements [start, stop); None where the file system cannot map."""
        info = self.tensors[name]
        nbytes = (stop - start) * info.itemsize
        pos = info.begin + start * info.itemsize
        lo = pos - pos % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(self._fileno(), pos + nbytes - lo, offset=lo,
                           access=mmap.ACCESS_COPY)
        except (OSError, ValueError):  # a file system without mmap (some FUSE / network FS)
            return None
        err = _populate(mm)
        if err:
            mm.close()
            raise CheckpointError(f"{self.path}, tensor {name!r}: reading failed "
                                  f"({os.strerror(err)})")
        return mm, pos - lo, nbytes

    def view(self, name: str, start: int = 0, stop: Optional[int] = None) -> memoryview:
        """The bytes of elements [start, stop) of tensor ``name`` as a read-only memoryview of
        a populated mapping (``map`` without torch), or of a copy where the file system cannot
        map."""
        info = self.tensors[name]
        stop = info.numel if stop is None else stop
        got = self._mapping(name, start, stop) if stop > start else None
        if got is None:
            mv = memoryview(bytearray((stop - start) * info.itemsize))
            self._pread(name, mv, info.begin + start * info.itemsize)
            return mv.toreadonly()
        mm, off, nbytes = got
        return memoryview(mm)[off:off + nbytes].toreadonly()

    def map(self, name: str, start: int = 0, stop: Optional[int] = None):
        """Elements [start, stop) of tensor ``name`` like ``read``, backed by a private
        (copy-on-write) mapping of that byte range instead of a copy. The pages are populated
        here, so I/O errors surface now as a CheckpointError and the kernels that read the
        tensor do not stall on page faults; the mapping goes when the tensor is freed."""
        import torch
        info = self.tensors[name]
        stop = info.numel if stop is None else stop
        if stop <= start:
            return torch.empty(0, dtype=info.dtype)
        got = self._mapping(name, start, stop)
        if got is None:
            return self.read(name, start, stop)
        mm, off, nbytes = got
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=off)
        return t.view(info.dtype)

    def __del__(self):  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


WEIGHT_INDEX = "model.safetensors.index.json"


class Checkpoint:
    """A model directory of safetensors shards (with or without an index)."""

    def __init__(self, directory, label: str = ""):
        self.dir = Path(directory)
        self.label = label or str(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"model {self.label!r}: {self.dir} is not a directory")
        index = self.dir / WEIGHT_INDEX
        if index.exists():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
                files = sorted(set(wmap.values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            wmap = None
        if not files:
            other = [p.name for p in self.dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
            hint = f" (found {', '.join(other[:3])}: only safetensors is supported)" if other else ""
            raise CheckpointError(f"model {self.label!r}: no .safetensors files in "
                                  f"{self.dir}{hint}")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        for fn in files:
            p = self.dir / fn
            if not p.exists():
                raise CheckpointError(f"{index}: names shard {fn} but {p} does not exist")
            st = SafetensorsFile(p)
            self.files[fn] = st
            for name in st.tensors:
                if name in self.where:
                    raise CheckpointError(f"{p}, tensor {name!r}: also stored in "
                                          f"{self.where[name].path}")
                self.where[name] = st
        if wmap is not None:
            for name, fn in wmap.items():
                st = self.where.get(name)
                if st is None or st.path.name != fn:
                    raise CheckpointError(f"{index}: tensor {name!r} is mapped to {fn} but "
                                          f"that file does not hold it")

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def read(self, name: str, start: int = 0, stop: Optional[int] = None, out=None):
        return self.where[name].read(name, start, stop, out)

    def map(self, name: str, start: int = 0, stop: Optional[int] = None):
        return self.where[name].map(name, start, stop)

    def view(self, name: str, start: int = 0, stop: Optional[int] = None) -> memoryview:
        return self.where[name].view(name, start, stop)

    def path_of(self, name: str) -> Path:
        return self.where[name].path

    def close(self):
        for f in self.files.values():
            f.close()
