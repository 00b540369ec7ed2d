"""The memory budget -> chunk size, element ranges, and glibc's handling of freed chunk
buffers (torch-free: pipeline/native.py uses it too)."""
from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

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


def release_heap_pages() -> None:
    """The free pages inside glibc's heaps back to the OS now (malloc_trim(0)), thresholds
    unchanged: after a tensor whose sub-8 MiB temporaries (a float32 reference's, or the
    chunk copies of ``.bin``/LoRA inputs made on the read-ahead threads) leave the heaps
    fragmented, so the next tensor's do not grow them further. No-op off glibc."""
    malloc_trim = libc.function("malloc_trim", [ctypes.c_size_t])
    if malloc_trim is not None:
        malloc_trim(0)


FIXED_OVERHEAD = 16 * 2 ** 20   # thread stacks, python objects, allocator slack
TABLE_BYTES = NUM_BINS * 16      # one histogram row: int64 counts + float64 sums
THREAD_TABLE_BYTES = NUM_BINS * 8   # a kernel thread's own uint64 counts of one row
# requests per model of a selection (a band has a lower and an upper threshold)
SELECT_REQUESTS = {"topk": 1, "band": 2}


def kernel_threads() -> int:
    """The compiled kernels' thread count (pipeline/core_kernels.py threads(): OpenMP's)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)


def work_bytes_per_element(backend_name: str, n_models: int, extra: int = 0,
                           sparsifier: str = "dare", combine: str = "") -> int:
    """Scratch memory a backend needs per element of a chunk, beyond its inputs and output.

    The torch backend materialises float32 task vectors, masks and temporaries (measured for
    N = 3: 66 B/elem task arithmetic, 100-200 top-k/band/consensus, 300 DARE, whose Philox
    runs in int64 torch ops). The compiled kernels (backend "cpu", fastmerge._core) stream
    the fused merge, DARE's statistics and the Gram matrix in per-thread blocks of a few KiB
    (nothing per element); what they hold per element is a selection's (``select_bytes``).
    mergekit's other methods run their float32 reference on the chunk (N + 1 float32 inputs
    and a float32 output) or keep della's masks: the allowance they were measured under."""
    if backend_name == "torch":
        per_model = {"none": 24, "dare": 80}.get(sparsifier, 48)
        return per_model * (n_models + 1) + 32 + extra
    if combine == "mergekit" or sparsifier not in ("none", "dare", *SELECT_REQUESTS):
        return 8 * (n_models + 2) + extra
    return select_bytes(sparsifier, n_models) + extra


def select_bytes(sparsifier: str, n_models: int) -> int:
    """Per chunk element, a magnitude selection's scratch on the compiled kernels: the
    one-pass top-k (csrc/cpu/select.cpp) copies at most n/4 + 4096 float32 scores per request
    (1 B per element of the tensor, which is read whole at up to two chunks: 2 B per chunk
    element), and one thread per request narrows a subset of those copies (2 B more); the
    radix selection over more chunks spends the same room on guessed level-1 tables
    (``selection_window_rows``)."""
    return 4 * SELECT_REQUESTS.get(sparsifier, 0) * n_models


def thread_tables_bytes(sparsifier: str, n_models: int, threads: int) -> int:
    """The level-0 histogram rows each kernel thread keeps for the rest of the run
    (csrc/cpu/histogram.cpp's thread-local tables grow to the largest request and stay)."""
    return threads * n_models * THREAD_TABLE_BYTES if sparsifier in SELECT_REQUESTS else 0


@dataclass
class Chunking:
    chunk_elems: int        # elements per chunk (before row alignment)
    bytes_per_elem: int     # what one element of a chunk costs in memory, all buffers
    fixed: int
    reserved: int = 0       # of ``fixed``: whole-tensor reductions' state (reduce_state.py)
    work: Optional[int] = None   # of ``bytes_per_elem``: the kernels' scratch

    def describe(self) -> str:
        return (f"{self.chunk_elems:,} elements per chunk "
                f"({self.bytes_per_elem} B/element in flight)")


def plan_chunking(budget: int, backend_name: str, n_models: int, in_bytes_per_elem: int,
                  out_itemsize: int, extra_work: int = 0, device: str = "cpu",
                  sparsifier: str = "dare", reserved: int = 0, why: str = "",
                  combine: str = "", threads: Optional[int] = None) -> Chunking:
    """Largest chunk such that 3 loaded chunks (current, prefetched, one the caller still
    holds), 3 output chunks (computing, queued, being written), and for the C++ CPU kernels a
    4th (a freed output kept for reuse, ``backends.output_cache_limit``), and the backend's
    scratch fit in ``budget`` bytes, after the histograms (and the kernel threads' own level-0
    rows), a fixed allowance and ``reserved`` (what a reduction keeps over a whole tensor;
    ``why`` says so in the error)."""
    hist = 2 * (n_models + 1) * TABLE_BYTES
    work = 0
    if device == "cpu":
        outs = 4 if backend_name == "cpu" else 3
        work = work_bytes_per_element(backend_name, n_models, extra_work, sparsifier, combine)
        per = 3 * in_bytes_per_elem + outs * out_itemsize + work
        if backend_name != "torch":
            hist += thread_tables_bytes(sparsifier, n_models,
                                        kernel_threads() if threads is None else threads)
    else:  # host: one pinned staging set + outputs copied back; device memory is separate
        per = 2 * in_bytes_per_elem + 3 * out_itemsize
    fixed = FIXED_OVERHEAD + hist + reserved
    avail = budget - fixed
    elems = avail // per if avail > 0 else 0
    if elems < MIN_CHUNK_ELEMS:
        need = fixed + MIN_CHUNK_ELEMS * per
        raise ConfigError(f"memory budget {budget} bytes ({budget / 2 ** 20:.1f} MiB) is too "
                          f"small for this merge: it needs at least {need} bytes "
                          f"({need / 2 ** 20:.1f} MiB){why}")
    return Chunking(int(elems), per, fixed, reserved, work)


def selection_window_rows(n_models: int, chunk_elems: int, threads: int = 1,
                          work: Optional[int] = None) -> int:
    """The level-1 tables a chunked selection may guess and hold in its level-0 read
    (planning/radix.py radix_select_one_read) within the budget: the 2 (N + 1) histogram
    rows ``plan_chunking`` reserves less the N level-0 ones, and the kernels' per-element
    scratch of a chunk (``work``; the compiled kernels' of a top-k where not given), idle
    while a tensor is selected. A table costs its row (1 MiB) and each kernel thread's own
    counts of it (512 KiB, csrc/cpu/histogram.cpp), which stay after the call."""
    if work is None:
        work = select_bytes("topk", n_models)
    room = (n_models + 2) * TABLE_BYTES + work * chunk_elems
    return room // (TABLE_BYTES + threads * THREAD_TABLE_BYTES)


def element_ranges(shape: Sequence[int], max_elems: int) -> list[tuple[int, int]]:
    """[start, stop) element ranges covering a tensor, whole rows per range when a row fits."""
    n = math.prod(shape)
    if n <= max_elems:
        return [(0, n)]
    row = n // shape[0] if len(shape) > 1 and shape[0] > 0 else 1
    step = (max_elems // row) * row if row <= max_elems else max_elems
    return [(s, min(n, s + step)) for s in range(0, n, step)]
