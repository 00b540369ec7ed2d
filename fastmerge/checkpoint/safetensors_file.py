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
import itertools
import json
import math
import mmap
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import libc

# safetensors dtype codes -> bytes per element (the dtypes a checkpoint may hold). This module
# reads headers and maps bytes without torch (pipeline/native.py merges without importing it);
# the torch dtypes come from torch_dtypes() once something asks for a tensor.
ST_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4,
            "I64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MERGEABLE_ST = ("BF16", "F16", "F32")
# the config's dtype names (recipe/config.py) -> safetensors codes
# The files beside the weights that a merge copies from the base model (and so checks on open)
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
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


def element_buffer(info: TensorInfo, n: int, out=None):
    """A torch tensor for ``n`` elements of ``info``'s dtype: a fresh one, or the front of
    ``out`` (a uint8 buffer such as pinned staging). Imports torch."""
    import torch
    dtype = torch_dtypes()[info.st]
    return torch.empty(n, dtype=dtype) if out is None else out[:n * info.itemsize].view(dtype)


def __getattr__(name):  # ST_DTYPES, TORCH_TO_ST, MERGEABLE: torch dtypes, built on first use
    if name == "ST_DTYPES":
        return torch_dtypes()
    if name == "TORCH_TO_ST":
        return {v: k for k, v in torch_dtypes().items()}
    if name == "MERGEABLE":
        return tuple(torch_dtypes()[k] for k in MERGEABLE_ST)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

MAX_HEADER = 100_000_000         # the safetensors crate's own limit (bytes)
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


# The dtype names the safetensors library (0.8) knows: those fastmerge cannot read are refused as
# "unsupported", any other name as "unknown".
LIBRARY_DTYPES = frozenset(ST_SIZES) | {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ",
                                        "F8_E5M2FNUZ", "C64"}
MAX_JSON_DEPTH = 127  # serde_json's recursion limit: the library refuses deeper headers
_U64 = 1 << 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_ODD_INT = re.compile(rb"-[0-9]|[0-9]{21}")  # a negative or beyond-u64 integer, maybe
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_STEP = [0] * 256
_DEPTH_STEP[ord("[")] = _DEPTH_STEP[ord("{")] = 1
_DEPTH_STEP[ord("]")] = _DEPTH_STEP[ord("}")] = -1


def quote(value, limit: int = 80) -> str:
    """``repr`` of a name or value from a file, cut to ``limit`` characters (errors never echo
    more of a file than that)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def json_depth(raw: bytes) -> int:
    """How deeply the JSON in ``raw`` nests arrays and objects (strings skipped), counted without
    recursion: Python's parser would otherwise accept what serde_json refuses, or overflow."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


class Pairs(list):
    """A JSON object as its (key, value) pairs in file order, so repeated keys stay visible."""


def _json_int(s: str):
    # serde_json reads an integer beyond u64 / i64 as a float, and one beyond f64 as an error
    if len(s) <= 20 and s[0] != "-":
        v = int(s)
        if 0 <= v < _U64:
            return v
    return _json_float(s)


def _json_float(s: str) -> float:
    v = float(s)
    if math.isinf(v):
        raise ValueError("number out of range")
    return v


def _refuse_constant(s: str):
    raise ValueError(f"{s} is not JSON")


def strict_json(text: str, raw: Optional[bytes] = None):
    """``json.loads`` as serde_json reads it: objects as ``Pairs``; integers as ints only
    within u64 (the rest as floats, which no shape or offset accepts; -0 too); no NaN or
    Infinity; no lone surrogate escapes anywhere."""
    raw = text.encode("utf-8", "surrogatepass") if raw is None else raw
    # the hooks and the walk cost time per value: only where the text can need them
    odd_ints = _ODD_INT.search(raw) is not None
    value = json.loads(text, object_pairs_hook=Pairs, parse_int=_json_int if odd_ints else None,
                       parse_float=_json_float, parse_constant=_refuse_constant)
    if _SURROGATE_ESCAPE.search(raw) is None:
        return value
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            _check_string(v)
        elif isinstance(v, Pairs):
            for k, x in v:
                _check_string(k)
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
    return value


def _check_string(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("lone surrogate in a string escape") from None


def json_reason(exc: BaseException) -> str:
    """The parser's complaint without the text it quotes."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc)[:120]


def _u64_list(v) -> bool:
    """A JSON array of integers in [0, 2**64): what serde reads as Vec<usize>."""
    if type(v) is not list:
        return False
    for d in v:
        if type(d) is not int or d < 0 or d >= _U64:
            return False
    return True


def open_regular(path: Path, what: str):
    """``path`` opened for reading in binary, refused with one line unless it is a regular file
    (a FIFO would block the merge, a directory fail later with a traceback)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open the {what} ({os_reason(exc, path)})") \
            from None
    except ValueError:  # an embedded NUL
        raise CheckpointError(f"{quote(str(path))}: not a valid file name") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: the {what} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def os_reason(exc: OSError, path: Path) -> str:
    """Why ``path`` could not be opened, in words (a dangling symlink said as such)."""
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"a symlink to {quote(os.readlink(path))} that does not exist"
    return exc.strerror or str(exc)


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
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self._fd: Optional[int] = None
        raw = self._read_header()
        self._parse_header(raw)

    def _fail(self, why: str, tensor: Optional[str] = None,
              hint: str = " (truncated or corrupt safetensors file?)"):
        where = f"{self.path}" + (f", tensor {quote(tensor)}" if tensor is not None else "")
        raise CheckpointError(f"{where}: {why}{hint}")

    def _read_header(self) -> bytes:
        """The header's JSON bytes (checked against the file size); sets ``size``."""
        with open_regular(self.path, "safetensors file") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size < 8:
                self._fail(f"file is {self.size} bytes, shorter than the 8-byte header length")
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > MAX_HEADER:
                self._fail(f"header length {hlen} is over the format's limit of {MAX_HEADER}")
            if 8 + hlen > self.size:
                self._fail(f"header length {hlen} exceeds the file size {self.size}")
            self.header_len = hlen
            raw = f.read(hlen)
        if len(raw) != hlen:
            self._fail("file ended inside the header")
        return raw

    def _parse_header(self, raw: bytes):
        """Refuse every header the safetensors library refuses (its parser: serde_json into
        ``Metadata``, then ``Metadata::validate``), and duplicate tensor names besides."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("header is not valid UTF-8")
        if json_depth(raw) > MAX_JSON_DEPTH:
            self._fail(f"header JSON is nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            header = strict_json(text, raw)
        except (ValueError, RecursionError) as exc:
            self._fail(f"header is not valid JSON ({json_reason(exc)})")
        if not isinstance(header, Pairs):
            self._fail("header is not a JSON object")
        entries, seen = [], set()
        for name, e in header:
            if name == "__metadata__":
                if name in seen:
                    self._fail("__metadata__ appears twice")
                seen.add(name)
                self.metadata = self._metadata(e)
                continue
            if name in seen:
                self._fail("tensor name appears twice in the header", name)
            seen.add(name)
            entries.append((name, *self._entry(name, e)))
        data_start, data_size = 8 + self.header_len, self.size - 8 - self.header_len
        # the library's validate: sorted by offsets, the data exactly covered, no overflow
        entries.sort(key=lambda t: (t[3][0], t[3][1]))
        at, prev = 0, None
        for name, dt, shape, (b, e) in entries:
            if e < b:
                self._fail(f"data_offsets {[b, e]} end before they begin", name)
            if b < at:
                self._fail(f"data_offsets {[b, e]} overlap tensor {quote(prev)}", name)
            if b > at:
                self._fail(f"data_offsets {[b, e]} leave bytes {at}..{b} of the data that no "
                           f"tensor covers", name)
            n = 1
            for d in shape:
                n *= d
                if n >= _U64:
                    self._fail(f"shape {shape} overflows 64 bits", name)
            want = n * ST_SIZES[dt]
            if want >= _U64:
                self._fail(f"shape {shape} of {dt} overflows 64 bits in bytes", name)
            if e - b != want:
                self._fail(f"data_offsets {[b, e]} span {e - b} bytes but shape {shape} of {dt} "
                           f"needs {want}", name)
            if e > data_size:
                self._fail(f"data_offsets {[b, e]} run past the end of the data "
                           f"({data_size} bytes)", name)
            at, prev = e, name
            self.tensors[name] = TensorInfo(name, dt, tuple(shape), data_start + b, data_start + e)
        if at != data_size:
            self._fail(f"bytes {at}..{data_size} of the data follow the last tensor and no "
                       f"tensor covers them")

    def _metadata(self, value) -> dict:
        if value is None:
            return {}
        if not isinstance(value, Pairs) or not all(isinstance(v, str) for _, v in value):
            self._fail("__metadata__ is not an object of strings")
        return dict(value)  # repeated keys: the last wins, as in the library

    def _entry(self, name: str, e) -> tuple:
        """(dtype code, shape, (begin, end)) of one header entry."""
        if isinstance(e, Pairs):
            fields = {}
            for k, v in e:
                if k in ("dtype", "shape", "data_offsets"):
                    if k in fields:
                        self._fail(f"field {k} appears twice", name)
                    fields[k] = v
            if len(fields) != 3:
                self._fail("entry must have dtype, shape and data_offsets", name)
            dt, shape, offs = fields["dtype"], fields["shape"], fields["data_offsets"]
        elif isinstance(e, list) and len(e) == 3:  # serde also reads a struct from a sequence
            dt, shape, offs = e
        else:
            self._fail("entry is not an object with dtype, shape and data_offsets", name)
        if isinstance(dt, Pairs) and len(dt) == 1 and dt[0][1] is None:
            dt = dt[0][0]  # serde's other spelling of a unit variant: {"F32": null}
        if not isinstance(dt, str) or dt not in LIBRARY_DTYPES:
            self._fail(f"unknown dtype {quote(dt)}", name)
        if not _u64_list(shape):
            self._fail(f"bad shape {quote(shape)}", name)
        if not _u64_list(offs) or len(offs) != 2:
            self._fail(f"bad data_offsets {quote(offs)}", name)
        if dt not in ST_SIZES:
            self._fail(f"unsupported dtype {dt} (fastmerge reads "
                       f"{', '.join(sorted(ST_SIZES))})", name, hint="")
        return dt, shape, tuple(offs)

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


def model_roots(directory: Path) -> list:
    """Where a model directory's files may resolve to: the directory itself (real path), and
    for a Hugging Face cache snapshot (``.../snapshots/<rev>``, its files symlinks into the
    repository's ``blobs``) that ``blobs`` directory."""
    real = Path(os.path.realpath(directory))
    roots = [real]
    for d in {Path(os.path.abspath(directory)), real}:
        blobs = d.parent.parent / "blobs"
        if d.parent.name == "snapshots" and blobs.is_dir():
            roots.append(Path(os.path.realpath(blobs)))
    return roots


class Checkpoint:
    """A model directory of safetensors shards (with or without an index).

    Nothing outside the directory is read: every shard, the index and the files a merge copies
    (config, tokenizer) must resolve (symlinks followed) inside it, or, for a Hugging Face
    cache snapshot, inside that repository's ``blobs``. With an index, exactly the tensors it
    lists are the checkpoint: a listed shard that lacks one, or holds one the index does not
    list, is an error (the two disagree, and a merge must not guess which is right)."""

    def __init__(self, directory, label: str = ""):
        self.dir = Path(directory)
        self.label = label or str(directory)
        try:
            is_dir = self.dir.is_dir()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"model {quote(self.label)}: cannot open {quote(str(self.dir))}"
                                  f" ({getattr(exc, 'strerror', None) or exc})") from None
        if not is_dir:
            raise CheckpointError(f"model {quote(self.label)}: {self.dir} is not a directory")
        self._roots = model_roots(self.dir)
        index = self.dir / WEIGHT_INDEX
        if os.path.lexists(index):
            wmap = self._read_index(index)
            files = sorted(set(wmap.values()))
            if not files:
                raise CheckpointError(f"{index}: weight_map lists no tensors")
        else:
            wmap = None
            try:
                files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            except OSError as exc:
                raise CheckpointError(f"model {quote(self.label)}: cannot list {self.dir} "
                                      f"({exc.strerror})") from None
        if not files:
            other = [p.name for p in self.dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
            hint = f" (found {', '.join(other[:3])}: fastmerge reads *.safetensors and " \
                f"pytorch_model*.bin)" if other else ""
            raise CheckpointError(f"model {quote(self.label)}: no .safetensors files in "
                                  f"{self.dir}{hint}")
        self._open_shards(files, index, wmap, SafetensorsFile)
        self._check_side_files()

    def _open_shards(self, files: list, index: Path, wmap: Optional[dict], open_file) -> None:
        """``self.files`` (file name -> ``open_file(path)``) and ``self.where`` (tensor name ->
        its file), checked: every file inside the directory and present, no tensor stored
        twice and, with an index (``wmap``), exactly the tensors it lists where it says."""
        self.files: dict = {}
        self.where: dict = {}
        for fn in files:
            p = self.inside(fn, index if wmap is not None else None)
            if not os.path.lexists(p):
                raise CheckpointError(f"{index}: names shard {quote(fn, 160)} but it does not "
                                      f"exist in {self.dir}")
            self._add_shard(fn, open_file(p))
        if wmap is not None:
            self._check_index(index, wmap)

    def _add_shard(self, fn: str, f) -> None:
        """Shard file ``fn`` (opened as ``f``) into ``self.files`` and its tensors into
        ``self.where``; a tensor another shard holds too is an error."""
        self.files[fn] = f
        for name in f.tensors:
            if name in self.where:
                raise CheckpointError(f"{f.path}, tensor {quote(name)}: also stored in "
                                      f"{self.where[name].path}")
            self.where[name] = f

    def _check_index(self, index: Path, wmap: dict, holder: str = "that file") -> None:
        """The index's ``wmap`` and the shards agree: every tensor where it says, no other."""
        for name, fn in wmap.items():
            st = self.where.get(name)
            if st is None or st.path.name != fn:
                raise CheckpointError(f"{index}: tensor {quote(name)} is mapped to "
                                      f"{quote(fn)} but {holder} does not hold it")
        for name, st in self.where.items():
            if name not in wmap:
                raise CheckpointError(f"{st.path}, tensor {quote(name)}: not listed in "
                                      f"{index} (the index and its shards disagree)")

    def _read_index(self, index: Path) -> dict:
        """The index's weight_map: tensor name -> shard file name, checked."""
        self.inside(index.name, None)
        with open_regular(index, "index") as f:
            raw = f.read()
        try:
            doc = strict_json(raw.decode("utf-8"), raw)
        except UnicodeDecodeError:
            raise CheckpointError(f"{index}: not a valid safetensors index (not UTF-8)") from None
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index (invalid JSON: "
                                  f"{json_reason(exc)})") from None
        wmap = [v for k, v in doc if k == "weight_map"] if isinstance(doc, Pairs) else None
        if not isinstance(doc, Pairs):
            raise CheckpointError(f"{index}: not a valid safetensors index (not a JSON object)")
        if len(wmap) != 1 or not isinstance(wmap[0], Pairs):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs one "
                                  f"\"weight_map\" object of tensor name -> shard file)")
        out = {}
        for name, fn in wmap[0]:
            if not isinstance(fn, str) or not fn:
                raise CheckpointError(f"{index}: tensor {quote(name)} is mapped to {quote(fn)}, "
                                      f"not a file name")
            if name in out:
                raise CheckpointError(f"{index}: tensor {quote(name)} is listed twice")
            out[name] = fn
        return out

    def inside(self, name: str, index: Optional[Path]) -> Path:
        """``self.dir / name``, refused before anything opens it unless it resolves (symlinks
        followed) inside the model directory."""
        where = f"{index}: entry" if index is not None else f"model {quote(self.label)}: file"
        p = self.dir / name
        if "\0" in name:
            raise CheckpointError(f"{where} {quote(name, 160)} is not a file name")
        try:
            real = Path(os.path.realpath(p))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{where} {quote(name, 160)}: cannot resolve "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
        if not any(r in real.parents for r in self._roots):
            raise CheckpointError(f"{where} {quote(name, 160)} resolves to "
                                  f"{quote(str(real), 160)}, outside the model directory "
                                  f"{self._roots[0]}; refused")
        return p

    def _check_side_files(self):
        """The files a merge copies from the model (config, tokenizer): inside the directory,
        readable, and config.json a JSON object."""
        for fn in COPIED_FILES:
            p = self.dir / fn
            if not os.path.lexists(p):
                continue
            self.inside(fn, None)
            with open_regular(p, fn) as f:
                raw = f.read() if fn == "config.json" else b""
            if fn == "config.json":
                try:
                    ok = isinstance(json.loads(raw.decode("utf-8")), dict)
                except (ValueError, RecursionError) as exc:
                    raise CheckpointError(f"{p}: not valid JSON ({json_reason(exc)})") from None
                if not ok:
                    raise CheckpointError(f"{p}: not a JSON object")

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
