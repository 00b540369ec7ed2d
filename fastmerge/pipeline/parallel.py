"""The seams a multi-process merge (torch.distributed, issue 9) plugs into. In one process they
are trivial; the engine only ever calls them. See docs/distributed.md.

- ``init_from_env``: under ``torchrun`` (WORLD_SIZE > 1) initialise the process group from the
  torchrun environment: gloo for CPU tensors, plus nccl for CUDA tensors when merging on GPUs
  (each rank then computes on ``cuda:LOCAL_RANK``).
- ``partition``: which tensors this rank merges. Tensors larger than half a rank's fair share
  of the bytes ("giant": embeddings, lm_head of a small model, ...) are split by rows over all
  ranks and merged first, by every rank in the same order; the other tensors are whole, and
  balanced by bytes (greedy longest-first, ``assign_tensors``).
- ``reducer`` / ``allreduce_histograms`` / ``allreduce_sum``: sum per-rank histograms and
  statistics. A split tensor's per-tensor thresholds and statistics pass ``reducer(name)``
  to ``plan_tensor`` (its first call checks that every rank is at that tensor: collectives
  pair up by call order, so the split tensors must come in one order on every rank, which
  driver.processing_order keeps); ``scope="model"`` reduces its level-0 and level-1
  histograms; LiNeS ``alpha: auto`` its L1 sums. Histogram counts are integers, so every
  threshold is exactly the single-process one; DARE masks are keyed by global element
  offsets, so the merged values are bitwise those of a single-process merge. (The float64
  sums that ride along, the L1 norms of ``rescale: l1`` on split tensors and of LiNeS
  ``alpha: auto``, add in another order; they become float32 factors, so they could differ
  only if a last-bit float64 difference crossed a float32 rounding boundary: odds ~1e-8 per
  factor.)
- ``output_directory`` / ``shard_writer``: one output directory for all ranks. Rank 0 builds
  the hidden temporary directory beside OUT_DIR and lays out every shard file (headers, full
  size); after a barrier every rank ``pwrite``s its tensors (or row ranges) at their offsets.
  ``writer.close(check=True)`` is the barrier at the end: all ranks' byte counts must add up
  to the layout. Only then does rank 0 (``is_index_writer``) write the index, config,
  tokenizer and model card and rename the directory into place; the others wait for it. A
  rank that fails removes the temporary directory and exits non-zero; torchrun then stops the
  others, so no complete-looking OUT_DIR is ever left.
"""
from __future__ import annotations

import errno
import hashlib
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch

from ..output.writer import AtomicDirectory, OutputError, ShardWriter, _raise_write_error
from .launch_env import env_world, local_rank, local_world_size  # noqa: F401 (re-exported)
from .streaming import element_ranges

SPLIT_ENV = "FASTMERGE_SPLIT_BYTES"          # tensors above this many bytes are split by rows
FAIL_ENV = "FASTMERGE_TEST_FAIL_RANK"        # "RANK:N": that rank fails after N tensors (tests)
TIMEOUT_ENV = "FASTMERGE_DIST_TIMEOUT"       # seconds a collective may wait (default 1800)

_owns_group = False


# ----------------------------------------------------------------------------- process group
def world() -> tuple[int, int]:
    """(rank, world_size): from torch.distributed when initialised, else (0, 1)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return 0, 1


def rank_prefix() -> str:
    """'rank R of K: ' in a multi-process run (from torch.distributed or torchrun's env)."""
    rank, size = world()
    if size == 1:
        rank, size = env_world()
    return f"rank {rank} of {size}: " if size > 1 else ""


def init_from_env(device: str = "cpu") -> str:
    """Initialise torch.distributed from torchrun's variables when WORLD_SIZE > 1 and it is
    not initialised yet. CPU merges use gloo; CUDA merges get ``cpu:gloo,cuda:nccl`` (the
    engine's reductions are small CPU tensors; nccl is there for CUDA tensors) and this rank's
    GPU is made current (LOCAL_RANK), so "cuda" means that GPU. Returns ``device``."""
    global _owns_group
    import torch.distributed as dist
    _, size = env_world()
    cuda = str(device).startswith("cuda")
    if cuda and size > 1 and torch.cuda.is_available():
        if str(device) == "cuda":
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    if size <= 1 or dist.is_initialized():
        return device
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set: launch multi-process "
                         f"merges with torchrun (see docs/distributed.md)")
    if not dist.is_available() or not dist.is_gloo_available():
        raise ValueError("this torch build has no torch.distributed/gloo; a multi-process "
                         "merge needs it")
    backend = "gloo"
    if cuda and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    _owns_group = True
    _interrupt_on_sigterm()
    return device


def _interrupt_on_sigterm() -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: turn it into
    KeyboardInterrupt so this rank, too, removes the temporary output before it exits."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)     # a second SIGTERM kills
        raise KeyboardInterrupt("SIGTERM from the launcher (another rank failed?)")
    signal.signal(signal.SIGTERM, handler)


def shutdown() -> None:
    """Destroy the process group if ``init_from_env`` created it (after a successful merge)."""
    global _owns_group
    if _owns_group:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        _owns_group = False


def barrier() -> None:
    """A barrier through gloo on a CPU tensor (no device guessing with nccl)."""
    allreduce_sum(torch.zeros(1, dtype=torch.int64))


# ----------------------------------------------------------------------------- reductions
def allreduce_histograms(hist, n_models: Optional[int] = None):
    """Sum a selection.Histograms over ranks (in place). A rank with nothing to histogram
    passes None and ``n_models``: it contributes zeros."""
    if hist is None:
        from ..abi import NUM_BINS
        from ..planning.selection import Histograms
        if n_models is None:
            raise ValueError("allreduce_histograms(None) needs n_models")
        hist = Histograms(torch.zeros(n_models, NUM_BINS, dtype=torch.int64),
                          torch.zeros(n_models, NUM_BINS, dtype=torch.float64))
    if world()[1] > 1:
        allreduce_sum(hist.counts)
        allreduce_sum(hist.sums)
    return hist


class PeerFailure(OutputError):
    """A collective failed: another rank crashed or was stopped (its own message says why)."""


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:     # DistBackendError, gloo "Connection closed by peer", ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerFailure(errno.EIO, f"stopping: another rank failed or was stopped (its own "
                                     f"message says why; nothing is left in the output "
                                     f"directory) [{first}]") from None


def allreduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks in place (and return it)."""
    if world()[1] > 1:
        import torch.distributed as dist
        _collective(dist.all_reduce, values)
    return values


def _reduce_in_place(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None:
            allreduce_sum(t)


def reducer(name: Optional[str] = None):
    """The ``reduce`` callable of plan_tensor/level0/select for data split over ranks (sums
    histograms and statistics in place), or None in one process. With ``name`` (one split
    tensor's reductions) its first call checks that every rank reduces that tensor."""
    if world()[1] == 1:
        return None
    if name is None:
        return _reduce_in_place
    checked = []

    def reduce(*tensors: torch.Tensor) -> None:
        if not checked:
            _check_same_tensor(name)
            checked.append(True)
        _reduce_in_place(*tensors)
    return reduce


def _check_same_tensor(name: str) -> None:
    """Collective: raise unless every rank is at tensor ``name``. Collectives pair up by call
    order, so ranks that reached their split tensors in different orders would otherwise sum
    one tensor's histograms with another's, silently (same shapes)."""
    import torch.distributed as dist
    d = int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little")
    both = torch.tensor([d, -d], dtype=torch.int64)     # max of both: every rank's d is equal
    _collective(dist.all_reduce, both, op=dist.ReduceOp.MAX)
    if int(both[0]) != d or int(both[1]) != -d:
        raise RuntimeError(f"rank {world()[0]} reduces tensor {name!r} while another rank "
                           f"reduces another tensor: the ranks merge their split tensors in "
                           f"different orders (a fastmerge bug)")


# ----------------------------------------------------------------------------- assignment
def assign_tensors(names: list, sizes: dict, rank: int, world_size: int) -> list:
    """Greedy longest-first partition by bytes; every rank computes the same answer."""
    if world_size == 1:
        return list(names)
    loads = [0] * world_size
    owner = {}
    for name in sorted(names, key=lambda n: (-sizes[n], n)):
        r = loads.index(min(loads))
        owner[name] = r
        loads[r] += sizes[name]
    return [n for n in names if owner[n] == rank]


@dataclass
class Partition:
    names: list                                  # this rank's tensors, in merge order
    rows: dict = field(default_factory=dict)     # split tensor -> this rank's (row0, row1)

    @property
    def split(self) -> set:
        return set(self.rows)


def split_threshold(total_bytes: int, world_size: int) -> int:
    """Bytes above which a tensor is split by rows: FASTMERGE_SPLIT_BYTES if set, else half
    a rank's fair share (a bigger tensor cannot be balanced whole)."""
    env = os.environ.get(SPLIT_ENV)
    if env not in (None, ""):
        from ..output.writer import parse_size
        return parse_size(env, SPLIT_ENV) if env.strip() != "0" else 0
    return max(1, total_bytes // (2 * world_size))


def partition(names: list, sizes: dict, shapes: dict, rank: int, world_size: int) -> Partition:
    """Split giant tensors by rows over all ranks (merged first, in checkpoint order, so the
    collectives of their thresholds line up and start together) and balance the rest whole."""
    if world_size == 1:
        return Partition(list(names))
    limit = split_threshold(sum(sizes.values()), world_size)
    split = [n for n in names if sizes[n] > limit and len(shapes[n]) > 0 and
             int(shapes[n][0]) >= world_size]
    rows = {}
    for n in split:
        r = int(shapes[n][0])
        rows[n] = (rank * r // world_size, (rank + 1) * r // world_size)
    whole = [n for n in names if n not in rows]
    return Partition(split + assign_tensors(whole, sizes, rank, world_size), rows)


def local_ranges(shape, chunk_elems: int, rows: Optional[tuple]) -> list:
    """[start, stop) global element ranges of this rank's part of a tensor, in chunks."""
    if rows is None:
        return element_ranges(shape, chunk_elems)
    r0, r1 = rows
    if r1 <= r0:
        return []
    shape = tuple(int(s) for s in shape)
    row = 1
    for s in shape[1:]:
        row *= s
    return [(r0 * row + s, r0 * row + e)
            for s, e in element_ranges((r1 - r0, *shape[1:]), chunk_elems)]


def is_index_writer(rank: int) -> bool:
    return rank == 0


# ----------------------------------------------------------------------------- output
def _agree(ok: bool, what: str) -> None:
    """Collective: raise on every rank (same message) unless every rank is ``ok``."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    allreduce_sum(flag)
    if int(flag[0]):
        raise OutputError(errno.EIO, f"{what} on {int(flag[0])} rank(s); nothing was written")


class _SharedDirectory:
    """AtomicDirectory for K ranks: rank 0 owns the temporary directory and the rename; every
    rank removes the temporary directory if it fails."""

    def __init__(self, target, overwrite: bool):
        import torch.distributed as dist
        self.rank = world()[0]
        self.adir, msg = None, None
        if self.rank == 0:
            try:
                self.adir = AtomicDirectory(target, overwrite)
                path = str(self.adir.tmp)
            except (OSError, ValueError) as exc:
                path, msg = None, f"{type(exc).__name__}: {exc}"
        else:
            path = None
        box = [path, msg]
        _collective(dist.broadcast_object_list, box, src=0)
        path, msg = box
        if path is None:
            raise OutputError(errno.EIO, f"rank 0 could not create the output directory: {msg}")
        self.tmp = Path(path)
        self.target = Path(os.path.abspath(target))
        self.committed = False

    def commit(self) -> Path:
        if self.rank == 0:
            final = self.adir.commit()
            self.committed = True
            barrier()                   # the others return once the output is in place
        else:
            barrier()
            self.committed = True
            final = self.target
        return final

    def abort(self) -> None:
        if self.adir is not None:      # rank 0: also its lock, signal handlers, created parents
            self.adir.abort()
        elif not self.committed:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def output_directory(target, overwrite: bool = False):
    """AtomicDirectory in one process; a shared one (rank 0 renames) across ranks."""
    if world()[1] == 1:
        return AtomicDirectory(target, overwrite)
    return _SharedDirectory(target, overwrite)


class _FailAfter:
    """Test hook (FASTMERGE_TEST_FAIL_RANK="RANK:N"): that rank fails after N tensors."""

    def __init__(self, rank: int):
        spec = os.environ.get(FAIL_ENV, "")
        self.after = None
        if spec:
            r, _, n = spec.partition(":")
            if int(r) == rank:
                self.after = int(n or 0)
        self.names: set = set()

    def check(self, name: str) -> None:
        if self.after is None:
            return
        self.names.add(name)
        if len(self.names) > self.after:
            raise OutputError(errno.EIO, f"injected failure ({FAIL_ENV}) after "
                                         f"{self.after} tensor(s), at tensor {name!r}")


class _RankShardWriter(ShardWriter):
    """ShardWriter for one rank of K: the files exist already (rank 0 laid them out)."""

    def __init__(self, layout, directory: Path, rank: int, create: bool):
        self.rank = rank
        self._fail = _FailAfter(rank)
        self._checked = False
        if create:
            super().__init__(layout, directory)
            for si, fd in self._fds.items():        # full size now: holes until written
                try:
                    os.ftruncate(fd, layout.sizes[si])
                except OSError as exc:
                    self.close()
                    _raise_write_error(exc, self.dir / layout.files[si])
            return
        self.layout, self.dir = layout, Path(directory)
        self.shards = list(range(layout.count))
        self._fds = {}
        self.written = 0
        for si in self.shards:
            path = self.dir / layout.files[si]
            try:
                self._fds[si] = os.open(path, os.O_WRONLY)
            except OSError as exc:
                self.close()
                if exc.errno == errno.ENOENT:
                    raise OutputError(errno.ENOENT, f"{path} is not visible from "
                                      f"{socket.gethostname()}: a multi-node merge writes one "
                                      f"output directory, which must be on a filesystem every "
                                      f"node shares (see docs/distributed.md)") from None
                _raise_write_error(exc, path)

    def write(self, name, element_offset, tensor):
        self._fail.check(name)
        super().write(name, element_offset, tensor)

    def close(self, check: bool = False) -> None:
        if not check:
            super().close()
            return
        for si, fd in list(self._fds.items()):
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
                del self._fds[si]
        # the barrier at the end of the merge: every rank's bytes are on disk
        total = torch.tensor([self.written], dtype=torch.int64)
        allreduce_sum(total)
        if int(total[0]) != self.layout.total_size:
            raise OutputError(errno.EIO, f"the ranks wrote {int(total[0])} bytes of tensor "
                                         f"data, expected {self.layout.total_size}")
        if self.rank == 0:
            for si in self.shards:
                path = self.dir / self.layout.files[si]
                if path.stat().st_size != self.layout.sizes[si]:
                    raise OutputError(errno.EIO, f"{path}: {path.stat().st_size} bytes, "
                                                 f"expected {self.layout.sizes[si]}")


def _layout_digest(layout) -> str:
    h = hashlib.sha256()
    for f, hd, sz in zip(layout.files, layout.headers, layout.sizes):
        h.update(f.encode())
        h.update(hd)
        h.update(str(sz).encode())
    return h.hexdigest()


def shard_writer(layout, directory: Path):
    """ShardWriter in one process. Across ranks (collective): every rank checks it computed
    the same layout, rank 0 creates the files, then the others open them."""
    rank, size = world()
    if size == 1:
        return ShardWriter(layout, directory)
    import torch.distributed as dist
    digests = [None] * size
    _collective(dist.all_gather_object, digests, _layout_digest(layout))
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise OutputError(errno.EINVAL, f"ranks {bad} computed another output layout than rank "
                                        f"0 (different inputs, config or fastmerge version on "
                                        f"some node?)")
    writer, err = None, None
    if rank == 0:
        try:
            writer = _RankShardWriter(layout, directory, 0, create=True)
        except OSError as exc:
            err = exc
    _agree(err is None, "creating the shard files failed")
    if rank != 0:
        try:
            writer = _RankShardWriter(layout, directory, rank, create=False)
        except OSError as exc:
            err = exc
    try:
        _agree(err is None, "opening the shard files failed")
    except OutputError:
        if err is not None:
            raise err from None
        raise
    return writer

