"""``fastmerge merge`` on the CPU without importing torch.

Importing torch takes ~1 s on the 2-core machine of benchmarks/results/engine.md: the whole
0.2B task_arithmetic command took 1.2 s, the merge itself ~0.2 s of it. This path opens and
checks the checkpoints with the engine's torch-free modules (config, checkpoint_io, inputs,
writer, report, budget), computes the per-model parameters with fastmerge/params.py and
fastmerge/thresholds.py, and runs the same C++ kernels through fastmerge._core (pybind11 over
the mapped safetensors bytes): the one-pass top-k (csrc/cpu/select.cpp) for top-k and band
sparsifiers, the statistics pass where rescale="l1" needs it, the fused merge. Same kernels,
parameters and chunk offsets: the output is byte for byte the engine's on backend "cpu"
(tests/test_native.py).

``why_not`` says why a merge takes the engine instead: another device or backend, several
processes (torchrun), second moments (ota, ffg), ``scope: model``, LiNeS ``alpha: auto``,
fastmerge._core not built, or FASTMERGE_NATIVE=0. What only shows during the merge, a
selection over a tensor larger than one chunk or a sampled window that missed (both need the
radix selection), raises ``UseEngine``; ``merge`` then runs the engine from the start (the
partial output is removed like any failed merge's).
"""
from __future__ import annotations

import importlib
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Optional

from ..methods import METHODS
from ..params import F_RESCALE, keep_rows, needs_l1, pack_rows, pass_ids, rescale_factors
from .budget import (element_ranges, plan_chunking, release_freed_memory_promptly,
                     trim_freed_memory)
from ..thresholds import nonfinite_error, one_pass, per_model, selection_requests
from .checkpoint_io import NAME_TO_ST, ST_SIZES
from .config import MergeConfig, ParameterResolver, load_config
from .inputs import Inputs, merge_settings, name_files, open_inputs
from .report import (MergeResult, NonFiniteCheck, apply_lines, default_budget, describe,
                     nonfinite_in, peak_rss_bytes, progress_factory, write_extras)
from .writer import AtomicDirectory, ShardLayout, ShardWriter

_DTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2}   # DTYPE_* of csrc/common/fastmerge_params.h
_SELECTING = ("topk", "band")


class UseEngine(Exception):
    """This merge needs what only the engine does (the radix selection); nothing was kept."""


def _core():
    # Idle OpenMP workers sleep instead of spinning (unless the user chose): the kernels'
    # workers spun on the 2 cores the reader and writer threads need (0.47B task_arithmetic:
    # user time 1.0-1.5 -> 0.3-0.45 s, wall 0.93-1.75 -> 0.72-1.6 s; ties no slower). Read
    # when libgomp starts, i.e. here, unless something loaded it before.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from .. import _core
        return _core
    except ImportError:
        return None


def why_not(cfg: MergeConfig, device: str = "cpu", backend: str = "auto") -> Optional[str]:
    """None if ``cfg`` can merge here without torch, else the reason it cannot."""
    info = METHODS[cfg.method]
    if os.environ.get("FASTMERGE_NATIVE", "1") == "0":
        return "FASTMERGE_NATIVE=0"
    if str(device) != "cpu" or backend not in ("auto", "cpu"):
        return f"device {device} / backend {backend}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "several processes (torchrun)"
    if info.needs_second_moments:
        return f"merge_method {cfg.method} reads second moments"
    if info.sparsifier in _SELECTING and cfg.scope == "model":
        return "scope: model (model-wide histograms)"
    if cfg.lines is not None and cfg.lines.alpha == "auto":
        return "LiNeS alpha: auto"
    if _core() is None:
        return "fastmerge._core is not built"
    return None


def _threads() -> int:
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)


class _Merger:
    """Per tensor: the statistics pass where rescale="l1" needs it, then the fused pass into
    one of two reused output buffers, written by a writer thread while the next tensor merges;
    the next single-chunk tensor is mapped (and its pages populated) by a reader thread."""

    def __init__(self, inputs: Inputs, specs: dict, out_st: dict, chunk_elems: int,
                 nonfinite: NonFiniteCheck):
        self.inputs, self.specs, self.out_st = inputs, specs, out_st
        self.nonfinite = nonfinite
        self.chunk_elems = chunk_elems
        self.core = _core()
        self.nthreads = _threads()
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="fastmerge-read")
        self.writes = ThreadPoolExecutor(1, thread_name_prefix="fastmerge-write")
        # the NaN/Inf check of the outputs needs numpy (~0.2 s to import): imported by the idle
        # writer thread while the first tensors merge, instead of before the first write
        self.writes.submit(importlib.import_module, "numpy")
        self.buffers: list = [None, None]
        self.pending: list = [None, None]
        self.turn = 0

    def close(self):
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.writes.shutdown(wait=True, cancel_futures=True)

    def ranges(self, name):
        return element_ranges(self.inputs.reference.info(name).shape, self.chunk_elems)

    def load(self, name, s, e, only_reference=False):
        """(base view or None, model views) of elements [s, e) of ``name``."""
        r = self.inputs
        if only_reference:
            return r.reference.view(name, s, e), []
        return (r.base.view(name, s, e) if r.base is not None else None,
                [m.view(name, s, e) for m in r.models])

    def out_buffer(self, nbytes):
        """A buffer of at least nbytes whose previous write has finished."""
        k = self.turn
        self.turn ^= 1
        if self.pending[k] is not None:
            self.pending[k].result()
            self.pending[k] = None
        if self.buffers[k] is None or len(self.buffers[k]) < nbytes:
            self.buffers[k] = None
            self.buffers[k] = bytearray(nbytes)
        return k, memoryview(self.buffers[k])[:nbytes]

    def write(self, writer, k, name, offset, data, check=None):
        """Write ``data`` at element ``offset`` in the writer thread; with check = (stop,
        numel, dtype), a merged chunk, first look for NaN/Inf in it."""
        self.pending[k] = self.writes.submit(self._write, writer, name, offset, data, check)

    def _write(self, writer, name, offset, data, check):
        if check is not None:
            stop, numel, st = check
            self.nonfinite.found_in(name, offset, stop, numel, st, nonfinite_in(data, st))
        writer.write_bytes(name, offset, data)

    def flush(self):
        for k, f in enumerate(self.pending):
            if f is not None:
                f.result()
                self.pending[k] = None

    def merge_tensor(self, writer, name, loaded):
        r, spec = self.inputs, self.specs[name]
        ref = r.reference.info(name)
        base_code = _DTYPE_CODES[r.base.info(name).st] if r.base is not None else 0
        codes = [_DTYPE_CODES[m.info(name).st] for m in r.models]
        ranges = self.ranges(name)
        chunks = (lambda: [loaded]) if loaded is not None else \
            (lambda: (self.load(name, s, e) for s, e in ranges))
        thresholds = total = kept = None
        if spec.sparsifier in _SELECTING:
            if len(ranges) > 1:
                raise UseEngine(f"tensor {name!r} is larger than one chunk")
            thresholds, kept, total = self.select(name, spec, ref.numel, base_code, codes,
                                                  *next(iter(chunks())))
        frows, irows = keep_rows(spec, name, thresholds)
        if needs_l1(spec) and kept is None:
            fp, ip = pack_rows(frows, irows)
            total, kept = [0.0] * spec.n_models, [0.0] * spec.n_models
            for (s, e), (b, ms) in zip(ranges, chunks()):
                st = self.core.model_stats(b, base_code, ms, codes, fp, ip, float(spec.power), s,
                                           e - s, self.nthreads)
                for i in range(spec.n_models):
                    total[i] += st[3 * i]
                    kept[i] += st[3 * i + 1]
                del b, ms
        for i, x in enumerate(rescale_factors(spec, total, kept)):
            frows[i][F_RESCALE] = x
        fp, ip = pack_rows(frows, irows)
        ids = pass_ids(spec)
        out_st = self.out_st[name]
        for (s, e), (b, ms) in zip(ranges, chunks()):
            k, out = self.out_buffer((e - s) * ST_SIZES[out_st])
            bad = self.core.fused_merge(
                b, base_code, ms, codes, fp, ip, ids["combine"], ids["score"], ids["elect"],
                ids["elect_on"], ids["normalize"], spec.consensus_k, float(spec.scale),
                float(spec.power), float(spec.eps), s, e - s, out, _DTYPE_CODES[out_st],
                self.nthreads)
            del b, ms
            for i, c in enumerate(bad):
                if c:
                    raise name_files(nonfinite_error(i, c, (name,)), r, name)
            # finite inputs can still overflow the output dtype: the writer thread checks the
            # buffer the kernel wrote before writing it, while the next chunk merges
            self.write(writer, k, name, s, out, (e, ref.numel, out_st))

    def select(self, name, spec, numel, base_code, codes, b, ms):
        """Per-model (lo, hi), kept L1 and total L1 (None unless rescale="l1") of a top-k or
        band sparsifier over one chunk, by the one-pass top-k (plan.thresholds_from_selection
        does the same through the torch op)."""
        reqs = selection_requests(spec, numel)
        flat = [(i, k) for i, ks in enumerate(reqs) for k in ks]
        l1 = spec.rescale == "l1"

        def kernel(rows, l1):
            req = struct.pack(f"<{2 * len(rows)}q", *[x for r in rows for x in r])
            return self.core.topk_window(b, base_code, ms, codes, req, l1, numel, self.nthreads)
        try:
            got = one_pass(flat, numel, spec.n_models, l1, (name,), kernel)
        except ValueError as exc:
            raise name_files(exc, self.inputs, name) from None
        if got is None:
            raise UseEngine(f"tensor {name!r}: the sampled top-k window missed")
        sel, total = got
        out, kept = per_model(reqs, sel, l1)
        return out, kept, total

    def run(self, writer, order, bar):
        merged = set(self.specs)
        single = [len(self.ranges(x)) == 1 for x in order]

        def submit(j):
            if j < len(order) and single[j]:
                return self.reader.submit(self.load, order[j], 0, None, order[j] not in merged)
            return None
        fut = submit(0)
        try:
            for j, name in enumerate(order):
                loaded = fut.result() if fut is not None else None
                fut = submit(j + 1)
                if name in merged:
                    self.merge_tensor(writer, name, loaded)
                else:
                    for s, e in self.ranges(name):
                        data = loaded[0] if loaded is not None else \
                            self.load(name, s, e, only_reference=True)[0]
                        k, _ = self.out_buffer(0)   # keeps the two-writes-in-flight bound
                        self.write(writer, k, name, s, data)
                        del data
                loaded = None
                bar.update(self.inputs.in_bytes(name))
                bar.set_postfix_str(f"{j + 1}/{len(order)} tensors", refresh=False)
            self.flush()
        finally:
            if fut is not None:
                fut.cancel()
            # on failure too: no write may still run when the caller closes the shard files
            wait([f for f in self.pending if f is not None])


def merge_natively(cfg: MergeConfig, out_dir, *, memory_budget=None, shard_size="5GB",
                   seed: Optional[int] = None, overwrite: bool = False, quiet: bool = True,
                   lines_pattern: Optional[str] = None,
                   max_chunk_elems: Optional[int] = None, t0: Optional[float] = None,
                   allow_nonfinite: bool = False) -> MergeResult:
    """``merge_checkpoints`` on the CPU for a config ``why_not`` accepts (same arguments,
    same output and errors)."""
    t0 = time.perf_counter() if t0 is None else t0
    out_dir, budget, shard_bytes = merge_settings(cfg, out_dir, overwrite, memory_budget,
                                                  shard_size, lines_pattern, default_budget())
    release_freed_memory_promptly()
    inputs = open_inputs(cfg, False)
    merger, bits0 = None, None
    try:
        resolver = ParameterResolver(cfg, inputs.order, seed=seed, pattern=lines_pattern)
        merged, ref, n = inputs.merged, inputs.reference, len(inputs.models)
        base_specs = {x: resolver.spec_for(x) for x in merged}
        out_st = {x: NAME_TO_ST[cfg.output_dtype] if cfg.output_dtype else ref.info(x).st
                  for x in merged}
        out_st.update({x: ref.info(x).st for x in inputs.copied})
        in_item = max([ref.info(x).itemsize for x in merged] or [2])
        in_per_elem = (n + (1 if inputs.base is not None else 0)) * in_item
        out_item = max([ST_SIZES[out_st[x]] for x in merged] or [4])
        chunking = plan_chunking(budget, "cpu", n, in_per_elem, out_item, device="cpu",
                                 sparsifier=METHODS[cfg.method].sparsifier)
        if max_chunk_elems is not None:
            chunking.chunk_elems = max(1, min(chunking.chunk_elems, int(max_chunk_elems)))
        specs, lines_info = apply_lines(cfg, inputs.order, merged, base_specs,
                                        cfg.lines.alpha if cfg.lines is not None else None)
        resolved, per_tensor, config_text, st_meta = describe(
            cfg, inputs, "cpu", "cpu", specs, {"lines": lines_info} if lines_info else {})
        layout = ShardLayout([(x, ref.info(x).shape, out_st[x]) for x in inputs.order],
                             shard_bytes, st_meta)
        nonfinite = NonFiniteCheck(allow_nonfinite)
        merger = _Merger(inputs, specs, out_st, chunking.chunk_elems, nonfinite)
        if chunking.dare_bits:
            bits0 = merger.core.set_dare_bits_limit(chunking.dare_bits)
        progress = progress_factory(quiet)
        with AtomicDirectory(out_dir, overwrite) as adir:
            writer = ShardWriter(layout, adir.tmp)
            try:
                bar = progress("merging", sum(inputs.in_bytes(x) for x in inputs.order))
                try:
                    merger.run(writer, inputs.order, bar)
                finally:
                    bar.close()
                writer.close(check=True)
            finally:
                writer.close()
            write_extras(adir.tmp, layout, cfg, inputs, resolved, per_tensor, config_text)
            final = adir.commit()
        nonfinite.warn()
        bytes_in = sum(inputs.in_bytes(x) for x in inputs.order)
    finally:
        if merger is not None:
            merger.close()
            if bits0 is not None:
                merger.core.set_dare_bits_limit(bits0)
        for c in [inputs.base, *inputs.models]:
            if c is not None:
                c.close()
        trim_freed_memory()
    return MergeResult(
        output_dir=final, method=cfg.method, backend="cpu", device="cpu",
        tensors=len(inputs.order), shards=layout.count, bytes_in=bytes_in,
        bytes_out=layout.total_size, seconds=time.perf_counter() - t0,
        peak_rss=peak_rss_bytes(), peak_gpu=None, chunk_elems=chunking.chunk_elems,
        passes=["merge (without torch: fastmerge._core)"], resolved=resolved,
        nonfinite=nonfinite.found)


def merge(config, out_dir, *, device: str = "cpu", backend: str = "auto", **kwargs):
    """The CLI's merge: without torch where ``why_not`` allows, else ``merge_checkpoints``."""
    t0 = time.perf_counter()
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if why_not(cfg, device, backend) is None:
        try:
            return merge_natively(cfg, out_dir, t0=t0, **kwargs)
        except UseEngine:
            pass
    from .engine import merge_checkpoints
    return merge_checkpoints(cfg, out_dir, device=device, backend=backend, **kwargs)
