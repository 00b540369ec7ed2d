"""Sharded safetensors output written in place, and the atomic output directory.

The layout of every shard (which tensors, at which byte offsets) is a pure function of the
tensor names, shapes, dtypes and the shard size, so it is computed before the merge: each
shard's header is written first and tensor bytes (or row chunks of them) are written at
their offsets as they come out of the merge. Nothing waits in memory for a shard to fill,
and several processes could write disjoint tensors of the same shards (``pwrite``).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import libc
from .checkpoint_io import ST_SIZES, CheckpointError

INDEX_NAME = "model.safetensors.index.json"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


class OutputError(OSError):
    pass


@dataclass(frozen=True)
class Placement:
    shard: int          # 0-based
    begin: int          # absolute byte offset in the shard file
    nbytes: int
    itemsize: int


def parse_size(text, what: str = "size") -> int:
    """'5GB', '8GiB', '500M', '1e9' or a number of bytes -> bytes (at least 1, at most 1 EiB;
    NaN, infinities, zero and negative sizes are errors)."""
    units = {"": 1, "B": 1, "K": 10 ** 3, "KB": 10 ** 3, "KIB": 2 ** 10, "M": 10 ** 6,
             "MB": 10 ** 6, "MIB": 2 ** 20, "G": 10 ** 9, "GB": 10 ** 9, "GIB": 2 ** 30,
             "T": 10 ** 12, "TB": 10 ** 12, "TIB": 2 ** 40}
    value, unit = None, ""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    elif text is not None and not isinstance(text, bool):
        s = str(text).strip().upper().replace(" ", "")
        num = s.rstrip("KMGTIB")
        unit = s[len(num):]
        try:
            value = float(num)
        except ValueError:
            value = None
    example = "write e.g. 8GiB, 5GB or 500MB"
    if value is None or unit not in units:
        raise ValueError(f"cannot read {what} {text!r}; {example}")
    nbytes = value * units[unit]
    if nbytes != nbytes or nbytes < 1:   # NaN, zero, negative, under one byte
        raise ValueError(f"{what} {text!r} must be a positive number of bytes; {example}")
    if nbytes > 2 ** 60:                 # also inf and 1e400 (which float() reads as inf)
        raise ValueError(f"{what} {text!r} is too large (at most 1 EiB); {example}")
    return int(nbytes)


class ShardLayout:
    """Greedy shards in tensor order, each at most ``shard_size`` bytes of data (a tensor
    larger than that gets a shard of its own)."""

    def __init__(self, tensors: list, shard_size: int, metadata: Optional[dict] = None):
        # tensors: [(name, shape, dtype)]; dtype a torch dtype or a safetensors code ("BF16")
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        groups: list[list] = [[]]
        size = 0
        for name, shape, dtype in tensors:
            nb = _numel(shape) * _itemsize(dtype)
            if groups[-1] and size + nb > shard_size:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(shape), dtype, nb))
            size += nb
        self.count = len(groups)
        self.files = [f"model-{i + 1:05d}-of-{self.count:05d}.safetensors"
                      for i in range(self.count)]
        self.headers: list[bytes] = []
        self.placement: dict[str, Placement] = {}
        self.sizes: list[int] = []
        for si, group in enumerate(groups):
            header, off = {}, 0
            for name, shape, dtype, nb in group:
                header[name] = {"dtype": _st_code(dtype), "shape": list(shape),
                                "data_offsets": [off, off + nb]}
                off += nb
            if self.metadata:
                header = {"__metadata__": self.metadata, **header}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)   # data aligned to 8 bytes, like safetensors
            self.headers.append(struct.pack("<Q", len(raw)) + raw)
            start = 8 + len(raw)
            for name, shape, dtype, nb in group:
                d0 = header[name]["data_offsets"][0]
                self.placement[name] = Placement(si, start + d0, nb, _itemsize(dtype))
            self.sizes.append(start + off)
        self.total_size = sum(nb for g in groups for *_, nb in g)

    def weight_map(self) -> dict:
        return {name: self.files[p.shard] for name, p in self.placement.items()}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _st_code(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    from .checkpoint_io import TORCH_TO_ST   # a torch dtype: torch is loaded already
    return TORCH_TO_ST[dtype]


def _itemsize(dtype) -> int:
    return ST_SIZES[_st_code(dtype)]


def _raise_write_error(exc: OSError, path) -> None:
    if exc.errno == errno.ENOSPC:
        raise OutputError(errno.ENOSPC, f"disk full while writing {path}; nothing was "
                                        f"left behind — free space and run again") from None
    raise OutputError(exc.errno or errno.EIO, f"cannot write {path}: {exc}") from None


def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:done + (1 << 30)], offset + done)


# Linux sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE = 2): start writing a range to disk
# without waiting, so the fsync on close finds little left to do (0.2B preset: the closing
# fsync of 0.37 GB took 0.13 s of a ~1 s merge, now ~0). None elsewhere.
_sync_file_range = libc.function("sync_file_range",
                                 [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


class ShardWriter:
    """Writes the shards of ``layout`` under ``directory``: headers on open, tensor bytes at
    their offsets (``write(name, element_offset, tensor)``), sizes checked on close."""

    pwrite = staticmethod(_pwrite_all)   # tests monkeypatch this to simulate a full disk

    def __init__(self, layout: ShardLayout, directory: Path, shards=None):
        self.layout, self.dir = layout, Path(directory)
        self.shards = list(range(layout.count)) if shards is None else list(shards)
        self._fds: dict[int, int] = {}
        self.written = 0
        for si in self.shards:
            path = self.dir / layout.files[si]
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[si] = fd
                self.pwrite(fd, layout.headers[si], 0)
            except OSError as exc:
                self.close()
                _raise_write_error(exc, path)

    def write(self, name: str, element_offset: int, tensor) -> None:
        """Write a torch tensor's elements at ``element_offset`` of tensor ``name``."""
        import torch
        data = tensor.detach().reshape(-1)
        if data.device.type != "cpu":
            data = data.cpu()
        self.write_bytes(name, element_offset, data.contiguous().view(torch.uint8).numpy())

    def write_bytes(self, name: str, element_offset: int, data) -> None:
        """Write raw bytes (any buffer) at element ``element_offset`` of tensor ``name``."""
        p = self.layout.placement[name]
        raw = memoryview(data).cast("B")
        pos = p.begin + element_offset * p.itemsize
        if pos + len(raw) > p.begin + p.nbytes:
            raise CheckpointError(f"internal: write past the end of tensor {name!r}")
        try:
            self.pwrite(self._fds[p.shard], raw, pos)
            if _sync_file_range is not None:  # a hint: its errors surface in fsync
                _sync_file_range(self._fds[p.shard], pos, len(raw), 2)
        except OSError as exc:
            _raise_write_error(exc, self.dir / self.layout.files[p.shard])
        self.written += len(raw)

    def close(self, check: bool = False) -> None:
        for si, fd in list(self._fds.items()):
            try:
                if check:
                    os.fsync(fd)
            finally:
                os.close(fd)
                del self._fds[si]
        if check:
            for si in self.shards:
                path = self.dir / self.layout.files[si]
                if path.stat().st_size != self.layout.sizes[si]:
                    raise OutputError(errno.EIO, f"{path}: wrote {path.stat().st_size} bytes, "
                                                 f"expected {self.layout.sizes[si]}")


def write_index(layout: ShardLayout, directory: Path, metadata: dict) -> None:
    """model.safetensors.index.json (rank 0's job in a multi-process merge)."""
    index = {"metadata": {"total_size": layout.total_size, **metadata},
             "weight_map": layout.weight_map()}
    path = Path(directory) / INDEX_NAME
    try:
        path.write_text(json.dumps(index, indent=2) + "\n")
    except OSError as exc:
        _raise_write_error(exc, path)


def copy_model_files(src: Path, directory: Path, out_dtype=None) -> list[str]:
    """config.json (torch_dtype updated to ``out_dtype``: a name like "bfloat16" or a torch
    dtype) and tokenizer files from the base model."""
    copied = []
    for fn in COPIED_FILES:
        s = Path(src) / fn
        if not s.is_file():
            continue
        d = Path(directory) / fn
        try:
            if fn == "config.json" and out_dtype is not None:
                cfg = json.loads(s.read_text())
                cfg["torch_dtype"] = str(out_dtype).replace("torch.", "")
                d.write_text(json.dumps(cfg, indent=2) + "\n")
            else:
                shutil.copyfile(s, d)
        except OSError as exc:
            _raise_write_error(exc, d)
        except ValueError:
            shutil.copyfile(s, d)
        copied.append(fn)
    return copied


class AtomicDirectory:
    """Build the output in a hidden temporary directory beside ``target``; ``commit()``
    renames it into place (replacing ``target`` when overwrite). On any failure, including
    KeyboardInterrupt, the temporary directory is removed: nothing complete-looking stays."""

    def __init__(self, target, overwrite: bool = False):
        self.target = Path(target).resolve() if Path(target).exists() else \
            Path(os.path.abspath(target))
        self.overwrite = overwrite
        if self.target.exists() and not overwrite:
            raise FileExistsError(f"output directory {self.target} already exists; pass "
                                  f"--overwrite (overwrite=True) to replace it")
        if self.target.exists() and not self.target.is_dir():
            raise FileExistsError(f"output path {self.target} exists and is not a directory")
        parent = self.target.parent
        if not parent.exists():
            parent.mkdir(parents=True, exist_ok=True)
        self.tmp = parent / f".{self.target.name}.fastmerge-tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def commit(self) -> Path:
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.fastmerge-old-{os.getpid()}"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False
