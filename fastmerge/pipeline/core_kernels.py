"""The pipeline's kernels without torch: chunks are read-only views of the mapped safetensors
bytes, and the C++ CPU kernels run on them through fastmerge._core (pybind11): the one-pass
top-k (csrc/cpu/select.cpp), the statistics pass, the fused merge into two reused output
buffers. Same kernels, parameters and chunk offsets as backend "cpu": the output is byte for
byte the torch backends' (tests/test_golden_outputs.py). The kernels count the NaN/Inf values
they store, so an output chunk comes with its check (stored_output.StoreChecked).

The radix selection (a sampled top-k window that missed, a selection over a tensor of several
chunks, ``scope: model``) runs on _core's histograms (planning/radix.py, the bookkeeping the
torch backends share). What _core does not bind is delegated, for that step only, to backend
"cpu" on torch tensors over the same bytes (torch is imported then, once): the float32 merge
of LiNeS ``alpha: auto``. Second moments (ffg, ota) are not bound at all; those
methods take TorchKernels (native.why_not).
"""
from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Optional

from .. import abi
from ..abi import SCORE_MAGNITUDE
from ..backends.cpu import core
from ..checkpoint.safetensors_file import ST_SIZES
from ..methods.kernel_params import pack_rows
from ..output.report import nonfinite_in
from ..planning.thresholds import one_pass
from .budget import selection_window_rows
from .driver import SingleProcess
from .stored_output import StoreChecked

# safetensors dtype -> the kernels' raw-pointer dtype code
DTYPE_CODES = {"F32": abi.DTYPE_FLOAT32, "F16": abi.DTYPE_FLOAT16, "BF16": abi.DTYPE_BFLOAT16}


def threads() -> int:
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)


@dataclass
class BytesChunk:
    """Elements [offset, offset + numel) of one tensor: views of the base (or None) and of
    the models, with their safetensors dtype codes."""
    base: Optional[memoryview]
    models: list
    base_st: Optional[str]
    model_sts: list
    offset: int
    numel: int

    @property
    def reference(self) -> memoryview:
        return self.base if self.base is not None else self.models[0]


class CoreKernels:
    name = chunking_name = device = "cpu"
    merge_pass_label = "merge (without torch: fastmerge._core)"
    dist = SingleProcess()

    def __init__(self):
        self.window_rows = None   # n_models -> the guessed level-1 tables the budget allows
        self.core = core()
        self.nthreads = threads()
        self.buffers: list = [None, None]
        self.inputs = None
        self._torch = None

    def bind(self, inputs) -> None:
        self.inputs = inputs

    def configure(self, chunking, out_chunk_bytes: int) -> None:
        self.window_rows = partial(selection_window_rows, chunk_elems=chunking.chunk_elems,
                                   threads=self.nthreads, work=chunking.work)

    def start(self) -> None:
        pass

    def peak_gpu(self):
        return None

    def close(self) -> None:
        self.buffers = [None, None]
        if self._torch is not None:
            self._torch.close()

    # --- reading
    def load(self, name, start, stop, only_reference=False) -> BytesChunk:
        r = self.inputs
        if only_reference:
            ref = r.reference
            return BytesChunk(ref.view(name, start, stop), [], ref.info(name).st, [], start,
                              stop - start)
        base, models = r.sources(name)   # a slice job reads input tensors of other names
        return BytesChunk(
            base[0].view(base[1], start, stop) if base is not None else None,
            [c.view(n, start, stop) for c, n in models],
            base[0].info(base[1]).st if base is not None else None,
            [c.info(n).st for c, n in models], start, stop - start)

    @staticmethod
    def _codes(ch: BytesChunk):
        return (DTYPE_CODES[ch.base_st] if ch.base is not None else 0,
                [DTYPE_CODES[s] for s in ch.model_sts])

    # --- the planner's kernels
    def one_pass(self, source, requests, n_models, numel, score, names, l1):
        chunks = source()
        if score != SCORE_MAGNITUDE or not isinstance(chunks, list) or len(chunks) != 1 or \
                chunks[0].offset != 0:
            return None
        ch = chunks[0]
        base_code, codes = self._codes(ch)

        def kernel(rows, l1):
            req = struct.pack(f"<{2 * len(rows)}q", *[x for r in rows for x in r])
            return self.core.topk_window(ch.base, base_code, ch.models, codes, req, l1, numel,
                                         self.nthreads)
        return one_pass(requests, numel, n_models, l1, names, kernel)

    def radix(self, source, requests, n_models, score, names, reduce, l1, hist=None, numel=None):
        if score != SCORE_MAGNITUDE or reduce is not None:
            return self.torch().radix(self.as_torch(source), requests, n_models, score, names,
                                      reduce, l1, hist)
        if hist is None and numel:   # level 0 and guessed level-1 bins in one read of a chunk
            from ..planning.radix import radix_select_one_read
            cap = None if self.window_rows is None else self.window_rows(n_models)
            sel, total, sel.passes = radix_select_one_read(
                n_models, requests, source, self._histogram_chunk, self._windows_chunk, numel,
                names, l1, max_rows=cap)
            return sel, total
        from ..planning.radix import radix_select
        sel, total, sel.passes = radix_select(n_models, requests, self._histogram(source), names,
                                              l1, hist, uniform_bins=True)
        return sel, total

    def level0(self, source, n_models, score, names):
        if score != SCORE_MAGNITUDE:
            return self.torch().level0(self.as_torch(source), n_models, score, names)
        from ..planning.radix import level0_tables
        return level0_tables(n_models, self._histogram(source), names)

    def _histogram_chunk(self, ch: BytesChunk, targets, level: int, tables) -> None:
        """One chunk's level-``level`` histograms of the (model, prefix) ``targets`` rows,
        added into ``tables`` (radix.py's HistTables)."""
        base_code, codes = self._codes(ch)
        self.core.score_histogram(ch.base, base_code, ch.models, codes,
                                  targets.astype("<i8").tobytes(), level, ch.numel,
                                  tables.counts, tables.sums, self.nthreads)

    def _windows_chunk(self, ch: BytesChunk, rows, widths, counts, sums) -> None:
        """One chunk's level-1 histograms of (model, first prefix) ``rows`` of ``widths``
        prefixes each, added into the flat ``counts`` / ``sums``."""
        base_code, codes = self._codes(ch)
        self.core.score_histogram_windows(ch.base, base_code, ch.models, codes,
                                          rows.astype("<i8").tobytes(), list(widths), ch.numel,
                                          counts, sums, self.nthreads)

    def _histogram(self, source):
        """radix.py's ``accumulate``: one read pass of _core.score_histogram over the chunks of
        ``source``, added into the tables."""
        def accumulate(targets, level, tables):
            for ch in source():
                self._histogram_chunk(ch, targets, level, tables)
                del ch
        return accumulate

    def stats(self, source, score, frows, irows, power, reduce):
        fp, ip = pack_rows(frows, irows)
        n = len(frows)
        out = [[0.0, 0.0, 0.0] for _ in range(n)]
        for ch in source():
            base_code, codes = self._codes(ch)
            st = self.core.model_stats(ch.base, base_code, ch.models, codes, fp, ip,
                                       float(power), ch.offset, ch.numel, self.nthreads)
            for i in range(n):
                for j in range(3):
                    out[i][j] += st[3 * i + j]
            del ch
        return out

    # --- the fused pass
    def merge(self, ch: BytesChunk, plan, out_st: str, slot: int):
        packed = plan.compiled.get("core")
        if packed is None:
            packed = plan.compiled["core"] = pack_rows(plan.frows, plan.irows)
        fp, ip = packed
        out = self.out_buffer(slot, ch.numel * ST_SIZES[out_st])
        ids, spec = plan.ids, plan.spec
        base_code, codes = self._codes(ch)
        bad, stored = self.core.fused_merge(
            ch.base, base_code, ch.models, codes, fp, ip, ids["combine"], ids["score"],
            ids["elect"], ids["elect_on"], ids["normalize"], spec.consensus_k,
            float(spec.scale), float(spec.power), float(spec.eps), ch.offset, ch.numel, out,
            DTYPE_CODES[out_st], self.nthreads)
        return StoreChecked.of(out, stored), bad

    def out_buffer(self, slot: int, nbytes: int) -> memoryview:
        """Output ``slot``'s buffer (its last write is done), kept from tensor to tensor: a
        fresh one per tensor would be zeroed and faulted in again, page by page."""
        if self.buffers[slot] is None or len(self.buffers[slot]) < nbytes:
            self.buffers[slot] = None
            self.buffers[slot] = bytearray(nbytes)
        return memoryview(self.buffers[slot])[:nbytes]

    @staticmethod
    def chunk_numel(ch: BytesChunk) -> int:
        return ch.numel

    @staticmethod
    def nonfinite_of(out, out_st: str):
        if isinstance(out, StoreChecked):   # the kernel's store counted them
            return out.nonfinite
        return nonfinite_in(out, out_st)

    def write(self, writer, name, offset, out) -> None:
        writer.write_bytes(name, offset, out.data if isinstance(out, StoreChecked) else out)

    def write_copy(self, writer, name, offset, ch: BytesChunk) -> None:
        writer.write_bytes(name, offset, ch.reference)

    # --- LiNeS alpha="auto"
    def lines_sums(self, ch: BytesChunk, plan) -> tuple[float, float]:
        return self.torch().lines_sums(self.to_torch(ch), plan)

    def reduce_floats(self, values: list) -> list:
        return values

    # --- the steps delegated to backend "cpu" on torch tensors over the same bytes
    def torch(self):
        """TorchKernels on backend "cpu" (imports torch, once)."""
        if self._torch is None:
            from ..backends import get_backend
            from .torch_kernels import TorchKernels
            self._torch = TorchKernels(get_backend("cpu", "cpu"), "cpu", SingleProcess())
        return self._torch

    def to_torch(self, ch: BytesChunk):
        import torch

        from ..checkpoint.safetensors_file import torch_dtypes
        from ..planning.selection import Chunk

        def tensor(mv, st):
            with warnings.catch_warnings():   # read-only views: the kernels only read them
                warnings.simplefilter("ignore", UserWarning)
                return torch.frombuffer(mv, dtype=torch.uint8).view(torch_dtypes()[st])
        base = tensor(ch.base, ch.base_st) if ch.base is not None else None
        return Chunk(base, [tensor(m, s) for m, s in zip(ch.models, ch.model_sts)], [],
                     ch.offset)

    def as_torch(self, source):
        def chunks():
            got = source()
            if isinstance(got, list):
                return [self.to_torch(c) for c in got]
            return (self.to_torch(c) for c in got)
        return chunks
