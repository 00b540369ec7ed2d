"""The memory budget -> chunk size, element ranges, and glibc's handling of freed chunk
buffers (torch-free: pipeline/native.py uses it too)."""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Sequence

from ..abi import NUM_BINS
from ..checkpoint import libc
from ..recipe.config import ConfigError

MIN_CHUNK_ELEMS = 4096
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc mallopt parameters


def release_freed_memory_promptly() -> None:
    """Fix glibc's mmap threshold at 8 MiB (it otherwise grows to the largest freed block,
    up to 32 MiB, after which chunk-sized buffers come from the heap and freed ones stay
    resident), so large chunk buffers are their own mappings, returned to the OS when freed.
    (1 MiB measured ~1.7x slower on small tensors: every histogram became a fresh mapping.)
    The heap below that keeps its free pages during the merge (trim threshold 256 MiB) and
    ``trim_freed_memory`` returns them after it: at 4 MiB the heap top was given back and
    faulted in again for the next tensor's buffers; on the 0.2B preset (111 tensors) this cut
    the minor page faults of a merge from ~190k to ~50k and its system time by ~0.4 s.
    Peak RSS is unchanged (the heap never grows beyond its own peak). No-op off glibc."""
    mallopt = libc.function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 8 << 20)
        mallopt(M_TRIM_THRESHOLD, 256 << 20)   # until trim_freed_memory()


def trim_freed_memory() -> None:
    """After a merge: the heap's free pages back to the OS, and the 4 MiB trim threshold of
    before. No-op off glibc."""
    mallopt = libc.function("mallopt", [ctypes.c_int, ctypes.c_int])
    malloc_trim = libc.function("malloc_trim", [ctypes.c_size_t])
    if mallopt is not None and malloc_trim is not None:
        mallopt(M_TRIM_THRESHOLD, 4 << 20)
        malloc_trim(0)


FIXED_OVERHEAD = 16 * 2 ** 20   # thread stacks, python objects, allocator slack


def work_bytes_per_element(backend_name: str, n_models: int, extra: int = 0,
                           sparsifier: str = "dare") -> int:
    """Scratch memory a backend needs per element of a chunk, beyond its inputs and output.

    The torch backend materialises float32 task vectors, masks and temporaries (measured for
    N = 3: 66 B/elem task arithmetic, 100-200 top-k/band/consensus, 300 DARE, whose Philox
    runs in int64 torch ops); the compiled kernels stream."""
    if backend_name == "torch":
        per_model = {"none": 24, "dare": 80}.get(sparsifier, 48)
        return per_model * (n_models + 1) + 32 + extra
    return 8 * (n_models + 2) + extra


@dataclass
class Chunking:
    chunk_elems: int        # elements per chunk (before row alignment)
    bytes_per_elem: int     # what one element of a chunk costs in memory, all buffers
    fixed: int
    reserved: int = 0       # of ``fixed``: whole-tensor reductions' state (reduce_state.py)

    def describe(self) -> str:
        return (f"{self.chunk_elems:,} elements per chunk "
                f"({self.bytes_per_elem} B/element in flight)")


def plan_chunking(budget: int, backend_name: str, n_models: int, in_bytes_per_elem: int,
                  out_itemsize: int, extra_work: int = 0, device: str = "cpu",
                  sparsifier: str = "dare", reserved: int = 0, why: str = "") -> Chunking:
    """Largest chunk such that 3 loaded chunks (current, prefetched, one the caller still
    holds), 3 output chunks (computing, queued, being written), and for the C++ CPU kernels a
    4th (a freed output kept for reuse, ``backends.output_cache_limit``), and the backend's
    scratch fit in ``budget`` bytes, after the histograms, a fixed allowance and ``reserved``
    (what a reduction keeps over a whole tensor; ``why`` says so in the error)."""
    hist = 2 * (n_models + 1) * NUM_BINS * 16
    fixed = FIXED_OVERHEAD + hist + reserved
    if device == "cpu":
        outs = 4 if backend_name == "cpu" else 3
        per = 3 * in_bytes_per_elem + outs * out_itemsize + \
            work_bytes_per_element(backend_name, n_models, extra_work, sparsifier)
    else:  # host: one pinned staging set + outputs copied back; device memory is separate
        per = 2 * in_bytes_per_elem + 3 * out_itemsize
    avail = budget - fixed
    elems = avail // per if avail > 0 else 0
    if elems < MIN_CHUNK_ELEMS:
        need = fixed + MIN_CHUNK_ELEMS * per
        raise ConfigError(f"memory budget {budget} bytes ({budget / 2 ** 20:.1f} MiB) is too "
                          f"small for this merge: it needs at least {need} bytes "
                          f"({need / 2 ** 20:.1f} MiB){why}")
    return Chunking(int(elems), per, fixed, reserved)


def selection_window_rows(n_models: int, chunk_elems: int) -> int:
    """The level-1 tables (1 MiB each) a chunked selection may guess and hold in its level-0
    read (planning/radix.py radix_select_one_read) within the budget: the 2 (N + 1) histogram
    rows ``plan_chunking`` reserves less the N level-0 ones, and the C++ kernels' per-element
    scratch of a chunk, idle while a tensor is selected."""
    return n_models + 2 + work_bytes_per_element("cpu", n_models) * chunk_elems // (NUM_BINS * 16)


def element_ranges(shape: Sequence[int], max_elems: int) -> list[tuple[int, int]]:
    """[start, stop) element ranges covering a tensor, whole rows per range when a row fits."""
    n = math.prod(shape)
    if n <= max_elems:
        return [(0, n)]
    row = n // shape[0] if len(shape) > 1 and shape[0] > 0 else 1
    step = (max_elems // row) * row if row <= max_elems else max_elems
    return [(s, min(n, s + step)) for s in range(0, n, step)]
