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
import re
import shutil
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: leftovers are then never removed)
    fcntl = None

from ..checkpoint import libc
from ..checkpoint.safetensors_file import COPIED_FILES, ST_SIZES, CheckpointError

INDEX_NAME = "model.safetensors.index.json"


def _token() -> str:
    """8 random hex digits for a temporary name (os.urandom: importing ``secrets`` for this
    cost ~4 ms of every command's start)."""
    return os.urandom(4).hex()


class OutputError(OSError):
    def __str__(self):  # the message alone, not "[Errno 17] message"
        return self.strerror if self.strerror else super().__str__()


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
    from ..checkpoint.safetensors_file import TORCH_TO_ST  # a torch dtype: torch is loaded already
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
# Linux fallocate(fd, FALLOC_FL_KEEP_SIZE = 1, off, n): the shard's blocks reserved before its
# writes, so each write skips ext4's per-page delayed-allocation bookkeeping (about a quarter
# of a write's CPU time) and a full disk fails at the start; the size still grows by writes.
_fallocate = libc.function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                         ctypes.c_int64])


def _reserve(fd: int, start: int, stop: int) -> None:
    """Reserve bytes [start, stop) of ``fd`` where the file system can (a hint elsewhere);
    OSError(ENOSPC) when the disk cannot hold them."""
    if _fallocate is None or stop <= start:
        return
    if _fallocate(fd, 1, start, stop - start) != 0 and ctypes.get_errno() == errno.ENOSPC:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


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
                _reserve(fd, len(layout.headers[si]), layout.sizes[si])
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
        if _PAUSE_STAGE == "mid-write":
            pause_point("mid-write")

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


DTYPE_KEYS = ("torch_dtype", "dtype")   # transformers < 5 writes the first, 5 the second


def set_config_dtype(cfg: dict, dtype: str) -> dict:
    """``dtype`` under every dtype key the config (and each sub-config such as text_config)
    has; ``torch_dtype`` where the top level has none. Leaving one key at the base's dtype
    made transformers load a bf16 merge as fp32."""
    def update(d: dict) -> bool:
        found = False
        for key in DTYPE_KEYS:
            if key in d and (d[key] is None or isinstance(d[key], str)):
                d[key], found = dtype, True
        for v in d.values():
            if isinstance(v, dict):
                update(v)
        return found
    if not update(cfg):
        cfg["torch_dtype"] = dtype
    return cfg


def copy_model_files(src: Path, directory: Path, out_dtype=None, *, tokenizer_src=None,
                     config_updates: Optional[dict] = None) -> list[str]:
    """config.json (its dtype keys set to ``out_dtype``: a name like "bfloat16" or a torch
    dtype; ``config_updates``' keys set, e.g. a frankenmerge's layer count) from ``src`` and
    the tokenizer files from ``tokenizer_src`` (default ``src``, the base model)."""
    copied = []
    for fn in COPIED_FILES:
        s = Path(src if fn == "config.json" or tokenizer_src is None else tokenizer_src) / fn
        if not s.is_file():
            continue
        d = Path(directory) / fn
        try:
            if fn == "config.json" and (out_dtype is not None or config_updates):
                cfg = json.loads(s.read_text())
                if not isinstance(cfg, dict):
                    raise ValueError("config.json is not an object")
                if out_dtype is not None:
                    set_config_dtype(cfg, str(out_dtype).replace("torch.", ""))
                cfg.update(config_updates or {})
                d.write_text(json.dumps(cfg, indent=2) + "\n")
            else:
                shutil.copyfile(s, d)
        except OSError as exc:
            _raise_write_error(exc, d)
        except ValueError:
            shutil.copyfile(s, d)
        copied.append(fn)
    return copied


# ----------------------------------------------------------------------------- atomic output
TMP_TAG = "fastmerge-tmp"              # .<OUT name>.fastmerge-tmp-<pid>-<token>: a run's build
LOCK_NAME = ".fastmerge-lock"          # inside it, flock-ed by the live run that owns it
PAUSE_ENV = "FASTMERGE_TEST_PAUSE_AT"  # tests: a stage name ("tmp-created", "mid-write", ...)
RESUME_ENV = "FASTMERGE_TEST_RESUME"   # tests: the file whose creation ends that pause
_PAUSE_STAGE = os.environ.get(PAUSE_ENV)
_TERMINATING = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))
_caught = threading.Event()            # a terminating signal was caught: test pauses end
_paused: set = set()


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP while an output directory is being built: it unwinds like
    Ctrl-C (the temporary directory is removed) and the CLI exits with ``exit_status``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_status = 128 + signum


def pause_point(stage: str) -> None:
    """Test hook: with FASTMERGE_TEST_PAUSE_AT=<stage>, print "fastmerge-test: paused at
    <stage>" on stderr once and wait there until the file named by FASTMERGE_TEST_RESUME
    exists, a terminating signal is caught, or 60 s have passed (so that the signal and race
    tests can act at a known point of a real run)."""
    if os.environ.get(PAUSE_ENV) != stage or stage in _paused:
        return
    _paused.add(stage)
    print(f"fastmerge-test: paused at {stage}", file=sys.stderr, flush=True)
    resume, end = os.environ.get(RESUME_ENV), time.monotonic() + 60
    while time.monotonic() < end and not _caught.is_set() and \
            not (resume and os.path.exists(resume)):
        time.sleep(0.01)


class _SignalGuard:
    """While some output directory is open (process-wide, counted; main thread only), SIGINT,
    SIGTERM and SIGHUP raise ``Interrupted``; a signal whose disposition is "ignore" (SIGHUP
    under nohup) stays ignored. Inside ``deferred()`` a signal is only noted (``pending``),
    so that a rename or a removal is never cut in half."""

    def __init__(self):
        self.previous: dict = {}
        self.users = 0
        self.deferring = 0
        self.pending: Optional[int] = None

    def acquire(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        if self.users == 0:
            for sig in _TERMINATING:
                prev = signal.getsignal(sig)
                if prev is signal.SIG_IGN or prev is None:   # None: set outside Python
                    continue
                self.previous[sig] = prev
                signal.signal(sig, self._handle)
        self.users += 1
        return True

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            for sig, prev in self.previous.items():
                signal.signal(sig, prev)
            self.previous, self.pending = {}, None

    def _handle(self, signum, frame):
        _caught.set()
        if self.deferring:
            self.pending = signum
            return
        raise Interrupted(signum)

    def defer(self) -> None:
        self.deferring += 1

    def undefer(self) -> Optional[int]:
        """End one ``defer``; the signal noted meanwhile, if any (cleared)."""
        self.deferring -= 1
        pending, self.pending = self.pending, None
        return pending


_SIGNALS = _SignalGuard()


class OutputDir(type(Path())):
    """OUT_DIR as a run found it when it started: ``start_identity`` is (st_dev, st_ino) of the
    directory that was there (the only one --overwrite may replace), or None."""
    start_identity: Optional[tuple] = None


def output_dir_at_start(path) -> OutputDir:
    out = OutputDir(path)
    try:
        st = os.stat(out)     # through a symlink: AtomicDirectory resolves OUT_DIR too
        out.start_identity = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        out.start_identity = None
    return out


def _identity(path) -> Optional[tuple]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover (a platform without directory descriptors)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def rename_noreplace(src, dst) -> None:
    """Rename ``src`` to ``dst``; FileExistsError, and nothing done, if ``dst`` exists.
    renameat2(RENAME_NOREPLACE) on Linux. Elsewhere: Windows' rename never replaces; a file is
    hard-linked (never replaces) then unlinked; a directory claims ``dst`` with mkdir and is
    renamed onto that empty directory of its own. What remains there: if someone removes the
    claim and makes an empty directory in that instant, that empty directory is replaced."""
    if libc.renameat2(src, dst, libc.RENAME_NOREPLACE):
        return
    if os.name == "nt":  # pragma: no cover
        os.rename(src, dst)
        return
    if not os.path.isdir(src):
        try:
            os.link(src, dst)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system: check, then rename
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST),
                                      str(dst)) from None
            os.rename(src, dst)
            return
        os.unlink(src)
        return
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except OSError as exc:
        try:
            os.rmdir(dst)
        except OSError:
            pass
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def _pid_alive(pid: Optional[int]) -> bool:
    if pid is None or pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:     # EPERM: alive, someone else's
        return True
    return True


def _owner_gone(tmp: Path) -> bool:
    """Whether the run that built ``tmp`` is dead: its lock can be taken (and the lock file is
    still there), or, with no lock file (just created, committing, or an old fastmerge's), no
    process has the pid in its name."""
    try:
        fd = os.open(tmp / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        m = re.search(rf"{TMP_TAG}-(\d+)", tmp.name)
        return not _pid_alive(int(m.group(1)) if m else None)
    except OSError:
        return False
    try:
        if fcntl is None:  # pragma: no cover
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False    # held: a live run
        return _identity(tmp / LOCK_NAME) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    finally:
        os.close(fd)


def remove_dead_leftovers(target: Path) -> list:
    """Remove the temporary directories of runs to ``target`` that died (SIGKILL, power loss);
    a live run's is never touched. Returns the paths removed."""
    prefix = f".{target.name}.{TMP_TAG}-"
    try:
        entries = [e for e in os.scandir(target.parent) if e.name.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for e in entries:
        if e.is_dir(follow_symlinks=False) and _owner_gone(Path(e.path)):
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(Path(e.path))
    return removed


def _make_parents(directory: Path) -> list:
    """``mkdir -p directory``; the directories this call created, outermost first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    created = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:   # another process made it: not ours to remove
                continue
            created.append(d)
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(exc.errno or errno.EIO,
                          f"cannot create the output's parent directory {d}: "
                          f"{exc.strerror or exc}") from None
    return created


def _remove_empty(created: list) -> None:
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break


class AtomicDirectory:
    """Build the output in a hidden temporary directory beside ``target`` and ``commit()`` it
    with a rename that never replaces anything this run did not create:

    - ``target`` appearing meanwhile (a user, another run that finished first) is left alone;
      the finished output is kept as ``<target>.fastmerge-<pid>-<time>`` and OutputError says
      where;
    - with ``overwrite``, only the directory that was at ``target`` when the run started (its
      st_dev/st_ino; an ``OutputDir`` carries it from the start of the merge) is replaced,
      atomically (renameat2 RENAME_EXCHANGE where available);
    - on any failure, KeyboardInterrupt and SIGTERM/SIGHUP included (they raise
      ``Interrupted`` while the directory is open), the temporary directory and the parent
      directories this run created are removed;
    - a SIGKILL-ed run's temporary directory is recognised by the next run to ``target`` (its
      flock-ed lock file is free) and removed; a live run's is never touched.
    """

    def __init__(self, target, overwrite: bool = False):
        start = getattr(target, "start_identity", False)   # False: no record from the start
        self.target = Path(target).resolve() if Path(target).exists() else \
            Path(os.path.abspath(target))
        self.overwrite = overwrite
        self.replaces = None
        if self.target.exists():
            if not overwrite:
                raise FileExistsError(f"output directory {self.target} already exists; pass "
                                      f"--overwrite (overwrite=True) to replace it")
            if not self.target.is_dir():
                raise FileExistsError(f"output path {self.target} exists and is not a "
                                      f"directory")
            self.replaces = _identity(self.target)
            if start is not False and start != self.replaces:
                raise OutputError(errno.EEXIST, f"output directory {self.target} was created "
                                                f"or replaced after this merge started; it was "
                                                f"left untouched (nothing was written)")
        self.created_parents = _make_parents(self.target.parent)
        self.tmp: Optional[Path] = None
        self._lock_fd: Optional[int] = None
        self._guarded = False
        self._deferred = False
        try:
            self._guarded = _SIGNALS.acquire()
            remove_dead_leftovers(self.target)
            self.tmp = self.target.parent / \
                f".{self.target.name}.{TMP_TAG}-{os.getpid()}-{_token()}"
            try:
                self.tmp.mkdir()
            except OSError as exc:
                self.tmp = None
                raise OutputError(exc.errno or errno.EIO, f"cannot create the output beside "
                                                          f"{self.target}: {exc.strerror or exc}"
                                  ) from None
            self._lock_fd = self._lock(self.tmp)
            pause_point("tmp-created")
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _lock(tmp: Path) -> Optional[int]:
        """Lock a new file and only then name it LOCK_NAME: a lock file that exists is held."""
        if fcntl is None:  # pragma: no cover
            return None
        new = tmp / (LOCK_NAME + ".new")
        fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(new, tmp / LOCK_NAME)
        return fd

    def commit(self) -> Path:
        pause_point("commit")
        _SIGNALS.defer()     # a signal now waits for the rename (then the merge is complete)
        self._deferred = True
        lock = self.tmp / LOCK_NAME
        if lock.exists():
            lock.unlink()
        if self.replaces is not None:
            self._replace()
        else:
            self._place()
        _fsync_dir(self.target.parent)
        self.tmp, self.created_parents = None, []
        self._close()
        return self.target

    def _place(self) -> None:
        try:
            rename_noreplace(self.tmp, self.target)
        except FileExistsError:
            kept = self._keep()
            raise OutputError(errno.EEXIST, f"output directory {self.target} appeared while "
                                            f"this merge ran (another merge finished first, or "
                                            f"it was created); it was left untouched, and this "
                                            f"merge's output is in {kept}") from None

    def _replace(self) -> None:
        """Replace the directory the run started with, and nothing else."""
        try:
            swapped = libc.renameat2(self.tmp, self.target, libc.RENAME_EXCHANGE)
        except FileNotFoundError:      # it is gone: there is nothing to replace
            return self._place()
        if swapped:                    # ours is at target, what was there is at self.tmp
            if _identity(self.tmp) != self.replaces:
                theirs, self.tmp = self.tmp, None     # never removed, whatever happens next
                try:
                    libc.renameat2(theirs, self.target, libc.RENAME_EXCHANGE)
                except OSError:
                    raise OutputError(errno.EEXIST, f"output directory {self.target} was "
                                                    f"replaced while this merge ran; this "
                                                    f"merge's output is in {self.target} and "
                                                    f"what was there is in {theirs}") from None
                self.tmp = theirs                     # ours again
                self._refuse_replaced()
            shutil.rmtree(self.tmp, ignore_errors=True)
            return None
        # no renameat2 here: move it aside under a fresh name, check it, then place ours
        # (not a TMP_TAG name: if it is not the directory to replace, it must never be removed)
        aside = self.target.parent / \
            f".{self.target.name}.fastmerge-old-{os.getpid()}-{_token()}"
        try:
            os.rename(self.target, aside)
        except FileNotFoundError:
            return self._place()
        if _identity(aside) != self.replaces:
            try:
                rename_noreplace(aside, self.target)
            except FileExistsError:
                self._refuse_replaced(f"; what was there is now in {aside}")
            self._refuse_replaced()
        try:
            self._place()
        except OutputError as exc:
            raise OutputError(errno.EEXIST, f"{exc}; the directory it was to replace is in "
                                            f"{aside}") from None
        shutil.rmtree(aside, ignore_errors=True)
        return None

    def _refuse_replaced(self, more: str = "") -> None:
        kept = self._keep()
        raise OutputError(errno.EEXIST, f"output directory {self.target} is no longer the "
                                        f"directory --overwrite was to replace (it was replaced "
                                        f"while this merge ran); it was left untouched, and "
                                        f"this merge's output is in {kept}{more}")

    def _keep(self) -> Path:
        """Move the finished output beside ``target`` under a new visible name."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            kept = self.target.parent / \
                f"{self.target.name}.fastmerge-{os.getpid()}-{stamp}{f'-{i}' if i else ''}"
            try:
                rename_noreplace(self.tmp, kept)
            except FileExistsError:
                continue
            self.tmp, self.created_parents = None, []
            return kept
        return self.tmp  # pragma: no cover

    def abort(self) -> None:
        """Remove the temporary directory and the parents this run created (idempotent)."""
        if not self._deferred:
            _SIGNALS.defer()
            self._deferred = True
        removing = self.tmp is not None
        try:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
            _remove_empty(self.created_parents)
            self.created_parents = []
        finally:
            pending = self._close()
        if pending is not None and removing:
            raise Interrupted(pending)

    def _close(self) -> Optional[int]:
        """Unlock, end the deferral and give the signals back; the signal noted meanwhile."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        pending = None
        if self._deferred:
            pending = _SIGNALS.undefer()
            self._deferred = False
        if self._guarded:
            _SIGNALS.release()
            self._guarded = False
        return pending

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.tmp is not None:
            self.abort()
        return False
