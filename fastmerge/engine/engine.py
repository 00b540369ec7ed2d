"""``merge_checkpoints``: config -> validated inputs -> pre-passes -> streaming merge ->
atomic sharded output.

Passes over the checkpoint (each streams tensor by tensor, chunk by chunk):
1. scope="model" with a top-k/band/FFG sparsifier: level-0 histograms of every tensor, added
   into one per-model histogram, then one level-1 pass (radix selection over the whole model).
2. LiNeS alpha="auto": the merge at lambda = 1, L = 1 in float32, accumulating
   ||sum_i t_i||_1 and ||merged||_1 over the whole model; alpha = the first / (N * second).
   The per-tensor plans of this pass are kept and reused by the merge pass.
3. The merge: per tensor, the plan's own pre-passes (per-tensor selection, statistics) over
   its chunks, then the fused pass, each output chunk written at its offset in the shard.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from ..api import run_plan
from ..backends import dare_bits_limit, get_backend, output_cache_limit
from ..methods import METHODS
from ..ops import SCORE_FISHER, SCORE_MAGNITUDE
from ..plan import plan_tensor, thresholds_from_selection
from ..second_moments import finite_non_negative
from ..selection import level0, release_scratch
from . import parallel
from .checkpoint_io import TORCH_TO_ST, Checkpoint, CheckpointError
from .config import ConfigError, MergeConfig, ParameterResolver, load_config
from .inputs import merge_settings, name_files, open_inputs
from .report import (MergeResult, NonFiniteCheck, NonFiniteOutput, apply_lines,
                     default_budget, describe, nonfinite_in, peak_rss_bytes, progress_factory,
                     write_extras)
from .streaming import (ChunkLoader, plan_chunking, prefetched, release_freed_memory_promptly,
                        trim_freed_memory)
from .writer import ShardLayout



def _nonfinite_of(out: torch.Tensor):
    """report.nonfinite_in for an output chunk: over its bytes on the CPU, by torch on a GPU
    (where the bytes are not addressable)."""
    if out.device.type == "cpu":
        return nonfinite_in(out.reshape(-1).view(torch.uint8).numpy(), TORCH_TO_ST[out.dtype])
    bad = ~torch.isfinite(out.reshape(-1))
    if not bool(bad.any()):
        return None
    return int(bad.sum()), int(bad.nonzero()[0, 0])


# ----------------------------------------------------------------------------- the engine
class _Engine:
    def __init__(self, cfg, inputs, backend, device, chunking, resolver, progress):
        self.cfg, self.inputs, self.be, self.device = cfg, inputs, backend, device
        self.chunk_elems = chunking.chunk_elems
        self.resolver = resolver
        self.progress = progress
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="fastmerge-read")
        self.loader = ChunkLoader(inputs.base, inputs.models, inputs.preconditioners, device)
        self.with_moments = False
        self.plans: dict = {}
        self.passes: list = []
        self.rows: dict = {}            # tensor split over ranks -> this rank's rows

    def close(self):
        self.reader.shutdown(wait=True, cancel_futures=True)

    def units(self, name):
        shape = self.inputs.reference.info(name).shape
        return [(name, s, e) for s, e in
                parallel.local_ranges(shape, self.chunk_elems, self.rows.get(name))]

    def reduce(self, name):
        """plan_tensor's reduce for a tensor split over ranks, else None."""
        return parallel.reducer() if name in self.rows else None

    def load(self, unit, only_reference=False):
        name, s, e = unit
        chunk = self.loader.load(name, s, e, only_reference=only_reference,
                                 with_moments=self.with_moments,
                                 moment_names=self.inputs.moment_names.get(name))
        for i, v in enumerate(chunk.second_moments):
            if not finite_non_negative(v):
                pre = self.inputs.preconditioners[i]
                where = pre.path_of(self.inputs.moment_names[name][i]) \
                    if isinstance(pre, Checkpoint) else pre.path
                raise CheckpointError(f"{where}, tensor {self.inputs.moment_names[name][i]!r}: "
                                      f"second moments must be finite and non-negative "
                                      f"(exp_avg_sq); found NaN/Inf or negative values")
        return chunk

    def source(self, units):
        return lambda: prefetched(units, self.load, self.reader)

    def numel(self, name):
        return self.inputs.reference.info(name).numel

    def in_bytes(self, name):
        r = self.inputs
        n = r.in_bytes(name)
        if name in self.rows:            # this rank's rows of a tensor split over ranks
            r0, r1 = self.rows[name]
            n = n * (r1 - r0) // max(1, int(r.reference.info(name).shape[0]))
        return n

    # --- pass 1: model-wide thresholds
    def model_thresholds(self, spec0, names):
        score = SCORE_FISHER if spec0.score == "fisher" else SCORE_MAGNITUDE
        hist = None
        bar = self.progress("scope=model: histograms", sum(self.in_bytes(n) for n in names))
        try:
            for name in names:
                try:
                    h = level0(self.be, spec0.n_models, score, self.source(self.units(name)),
                               (name,))
                except ValueError as exc:
                    raise name_files(exc, self.inputs, name) from None
                hist = h if hist is None else hist.add(h)
                bar.update(self.in_bytes(name))
        finally:
            bar.close()
        hist = parallel.allreduce_histograms(hist, spec0.n_models)
        total = sum(self.numel(n) for n in self.inputs.merged)
        all_units = [u for n in names for u in self.units(n)]
        thr, _, _ = thresholds_from_selection(spec0, total, self.be, self.source(all_units),
                                              score, names, hist, reduce=parallel.reducer(),
                                              l1=False)
        self.passes += ["scope=model level-0 histograms", "scope=model level-1 selection"]
        return [tuple(t) for t in thr], total

    # --- pass 2: LiNeS alpha = ||sum_i t_i||_1 / (N ||merged||_1)
    def lines_alpha(self, names, thresholds):
        n = len(self.inputs.models)
        sums = torch.zeros(2, dtype=torch.float64)
        bar = self.progress("LiNeS alpha=auto", sum(self.in_bytes(x) for x in names))
        try:
            for name in names:
                spec = dataclasses.replace(self.resolver.spec_for(name), lambda_=1.0,
                                           lines_factor=1.0)
                units = self.units(name)
                src = self.source(units)
                try:
                    plan = plan_tensor(spec, src, self.be, self.numel(name), name, thresholds,
                                       reduce=self.reduce(name))
                    self.plans[name] = plan
                    for ch in src():
                        out = run_plan(self.be, ch, plan, torch.float32)
                        b = ch.base.to(torch.float32)
                        sums[1] += (out - b).abs().sum(dtype=torch.float64).cpu()
                        tsum = torch.zeros_like(b)
                        for m in ch.models:
                            tsum += m.to(torch.float32)
                        tsum -= n * b
                        sums[0] += tsum.abs().sum(dtype=torch.float64).cpu()
                        del out, b, tsum, ch
                except ValueError as exc:
                    raise name_files(exc, self.inputs, name) from None
                bar.update(self.in_bytes(name))
        finally:
            bar.close()
        sums = parallel.allreduce_sum(sums)
        self.passes.append("LiNeS alpha=auto statistics (merge at lambda=1, L=1)")
        if sums[1] == 0:
            return 1.0, sums.tolist()
        return float(sums[0] / (n * sums[1])), sums.tolist()

    # --- pass 3: the merge
    def merge(self, order, specs, out_dtypes, writer, thresholds, bar, nonfinite):
        writes = ThreadPoolExecutor(1, thread_name_prefix="fastmerge-write")
        pending_write = None
        merged = set(specs)

        def write(name, offset, tensor):
            nonlocal pending_write
            if pending_write is not None:
                pending_write.result()
            pending_write = writes.submit(writer.write, name, offset, tensor)

        jobs = [(name, self.units(name)) for name in order]

        def submit(k):
            if k < len(jobs) and len(jobs[k][1]) == 1:
                return self.reader.submit(self.load, jobs[k][1][0], jobs[k][0] not in merged)
            return None
        fut = submit(0)
        try:
            for k, (name, units) in enumerate(jobs):
                is_merged = name in merged
                if len(units) == 1:
                    chunk = fut.result() if fut is not None else self.load(units[0], not is_merged)
                    fut = submit(k + 1)
                    src = (lambda c: (lambda: [c]))(chunk)
                    del chunk
                else:
                    fut = None
                    src = (lambda u, ref: (lambda: prefetched(
                        u, lambda x: self.load(x, ref), self.reader)))(units, not is_merged)
                if not is_merged:
                    for ch in src():
                        write(name, ch.offset, ch.base if ch.base is not None else ch.models[0])
                        del ch
                else:
                    spec = specs[name]
                    try:
                        plan = self.plans.pop(name, None)
                        if plan is None:
                            plan = plan_tensor(spec, src, self.be, self.numel(name), name,
                                               thresholds, reduce=self.reduce(name))
                        else:
                            plan = dataclasses.replace(plan, spec=spec)
                        for ch in src():
                            off = ch.offset
                            out = run_plan(self.be, ch, plan, out_dtypes[name])
                            del ch
                            # finite inputs can still overflow the output dtype
                            nonfinite.found_in(name, off, off + out.numel(), self.numel(name),
                                               TORCH_TO_ST[out.dtype], _nonfinite_of(out))
                            write(name, off, out)
                            del out
                    except (CheckpointError, NonFiniteOutput):
                        raise
                    except ValueError as exc:
                        raise name_files(exc, self.inputs, name) from None
                del src
                bar.update(self.in_bytes(name))
                bar.set_postfix_str(f"{k + 1}/{len(jobs)} tensors", refresh=False)
            if pending_write is not None:
                pending_write.result()
        finally:
            if fut is not None:
                fut.cancel()
            writes.shutdown(wait=True, cancel_futures=True)
        self.passes.append("merge")


def merge_checkpoints(config, out_dir, *, device: str = "cpu", memory_budget=None,
                      shard_size="5GB", backend: str = "auto", seed: Optional[int] = None,
                      overwrite: bool = False, quiet: bool = True,
                      lines_pattern: Optional[str] = None,
                      max_chunk_elems: Optional[int] = None,
                      allow_nonfinite: bool = False) -> MergeResult:
    """Merge whole checkpoints as ``config`` says and write them to ``out_dir``.

    Args:
        config: a YAML file path, a YAML string, a mapping (mergekit-style, see
            fastmerge/engine/config.py) or a MergeConfig.
        out_dir: the output directory; built beside it and renamed into place when complete.
        device: "cpu" or "cuda" (where the merge computes).
        memory_budget: bytes or a string like "8GiB": bound on what the merge allocates
            (beyond the interpreter's own baseline); tensors larger than the budget are
            merged in row chunks. Default min(8 GiB, half the RAM).
        shard_size: output shard size ("5GB").
        backend: "auto", "torch", "cpu", "cuda" or "triton".
        seed: DARE seed (overrides the config's).
        overwrite: replace an existing ``out_dir``.
        quiet: no progress bars.
        lines_pattern: a regex with the block index as its last group (LiNeS depth and
            mergekit gradients); overrides the config's ``lines.pattern``.
        max_chunk_elems: cap on the elements per chunk (below what the budget allows).
        allow_nonfinite: write merged tensors with NaN/Inf values (an overflow of the output
            dtype), with a NonFiniteOutputWarning naming them, instead of stopping with
            NonFiniteOutput before anything is written.
    Returns:
        A MergeResult (``.summary()`` is the line the CLI prints).
    """
    t0 = time.perf_counter()
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    out_dir, budget, shard_bytes = merge_settings(
        cfg, out_dir, overwrite, memory_budget, shard_size, lines_pattern,
        default_budget() // parallel.local_world_size())
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA device")
    device = parallel.init_from_env(device)     # torchrun: process group, this rank's GPU
    try:
        be = get_backend(backend, device)
    except ValueError as exc:                   # a backend this machine cannot run
        raise ConfigError(str(exc)) from None
    release_freed_memory_promptly()
    cache0 = output_cache_limit(be, 0)   # _run sizes it to one output chunk

    info = METHODS[cfg.method]
    needs_moments = info.needs_second_moments
    inputs = open_inputs(cfg, needs_moments)
    try:
        res = _run(cfg, inputs, be, device, budget, shard_bytes, seed, overwrite, quiet,
                   lines_pattern, out_dir, t0, max_chunk_elems, allow_nonfinite)
        parallel.shutdown()
        return res
    finally:
        for c in [inputs.base, *inputs.models, *inputs.preconditioners]:
            if c is not None:
                c.close()
        release_scratch()
        output_cache_limit(be, 0)        # give the kept outputs back, then the usual limit
        output_cache_limit(be, cache0)
        trim_freed_memory()


def _run(cfg, inputs, be, device, budget, shard_bytes, seed, overwrite, quiet, lines_pattern,
         out_dir, t0, max_chunk_elems=None, allow_nonfinite=False) -> MergeResult:
    rank, world_size = parallel.world()
    resolver = ParameterResolver(cfg, inputs.order, seed=seed, pattern=lines_pattern)
    merged = inputs.merged
    # resolve every tensor's parameters now: config errors come before any work
    base_specs = {n: resolver.spec_for(n) for n in merged}
    n = len(inputs.models)
    ref = inputs.reference
    out_dtype = getattr(torch, cfg.output_dtype) if cfg.output_dtype else None
    out_dtypes = {name: out_dtype or ref.info(name).dtype for name in merged}
    out_dtypes.update({name: ref.info(name).dtype for name in inputs.copied})

    in_item = max([ref.info(x).itemsize for x in merged] or [2])
    in_per_elem = (n + (1 if inputs.base is not None else 0)) * in_item + \
        (n * 4 if needs_moments(cfg) else 0)
    alpha_auto = cfg.lines is not None and cfg.lines.alpha == "auto"
    chunking = plan_chunking(budget, be.name, n, in_per_elem,
                             max([out_dtypes[x].itemsize for x in merged] or [4]),
                             extra_work=12 if alpha_auto else 0, device=str(device),
                             sparsifier=METHODS[cfg.method].sparsifier)
    if max_chunk_elems is not None:
        chunking.chunk_elems = max(1, min(chunking.chunk_elems, int(max_chunk_elems)))
    output_cache_limit(be, chunking.chunk_elems *
                       max([out_dtypes[x].itemsize for x in merged] or [4]))
    bits0 = dare_bits_limit(be, chunking.dare_bits) if chunking.dare_bits else None
    progress = progress_factory(quiet or rank != 0)
    eng = _Engine(cfg, inputs, be, device, chunking, resolver, progress)
    eng.with_moments = needs_moments(cfg)
    part = parallel.partition(inputs.order, {x: ref.info(x).nbytes for x in inputs.order},
                              {x: ref.info(x).shape for x in inputs.order}, rank, world_size)
    mine, eng.rows = part.names, part.rows
    my_merged = [x for x in mine if x in base_specs]
    nonfinite = NonFiniteCheck(allow_nonfinite)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        # ---- pass 1: model-wide thresholds
        thresholds, model_info = None, {}
        spec0 = base_specs[merged[0]] if merged else None
        if cfg.scope == "model" and spec0 is not None and \
                spec0.sparsifier in ("topk", "band", "fisher"):
            for x in merged:
                s = base_specs[x]
                if s.densities != spec0.densities or s.gammas != spec0.gammas:
                    raise ConfigError(f"scope: model needs one density (and gamma) per model "
                                      f"over the whole model, but tensor {x!r} resolves to "
                                      f"density {list(s.densities)} vs {list(spec0.densities)}")
            thresholds, total = eng.model_thresholds(spec0, my_merged)
            model_info = {"model_thresholds": [list(t) for t in thresholds],
                          "model_elements": total}
        # ---- LiNeS
        alpha, auto_info = cfg.lines.alpha if cfg.lines is not None else None, {}
        if alpha_auto:
            alpha, sums = eng.lines_alpha(my_merged, thresholds)
            auto_info = {"alpha_auto_l1": {"sum_task_vectors": sums[0], "merged": sums[1]}}
        specs, lines_info = apply_lines(cfg, inputs.order, merged, base_specs, alpha)
        # ---- output layout and metadata (known only now: alpha, model thresholds)
        lines_info = {**auto_info, **lines_info}
        resolved, per_tensor, config_text, st_meta = describe(
            cfg, inputs, be.name, str(device), specs,
            {**model_info, **({"lines": lines_info} if lines_info else {})})
        layout = ShardLayout([(x, ref.info(x).shape, out_dtypes[x]) for x in inputs.order],
                             shard_bytes, st_meta)
        with parallel.output_directory(out_dir, overwrite) as adir:
            writer = parallel.shard_writer(layout, adir.tmp)
            try:
                bar = progress("merging", sum(eng.in_bytes(x) for x in mine))
                try:
                    eng.merge(mine, {x: specs[x] for x in my_merged}, out_dtypes, writer,
                              thresholds, bar, nonfinite)
                finally:
                    bar.close()
                writer.close(check=True)
            finally:
                writer.close()
            if parallel.is_index_writer(rank):
                write_extras(adir.tmp, layout, cfg, inputs, resolved, per_tensor, config_text)
            final = adir.commit()
        nonfinite.warn()
    finally:
        eng.close()
        if bits0 is not None:
            dare_bits_limit(be, bits0)
    bytes_in = sum(eng.in_bytes(x) for x in mine)
    return MergeResult(
        output_dir=final, method=cfg.method, backend=be.name, device=str(device),
        tensors=len(mine), shards=layout.count, bytes_in=bytes_in,
        bytes_out=layout.total_size, seconds=time.perf_counter() - t0,
        peak_rss=peak_rss_bytes(),
        peak_gpu=torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else None,
        chunk_elems=chunking.chunk_elems, passes=eng.passes, resolved=resolved,
        nonfinite=nonfinite.found)


def needs_moments(cfg: MergeConfig) -> bool:
    return METHODS[cfg.method].needs_second_moments
