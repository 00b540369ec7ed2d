"""The one checkpoint-merge pipeline: every whole-checkpoint path (``fastmerge merge``,
``merge_checkpoints``, torchrun, the integrations) runs ``merge`` here, parametrised by a
kernels object (``torch_kernels.TorchKernels`` over a torch backend, ``core_kernels.
CoreKernels`` over mapped bytes without torch). The module itself never imports torch.

``resolve`` does everything that needs no weight: settings, the inputs opened and checked
(config, index, headers), every tensor's parameters, the chunk size, this rank's tensors;
``fastmerge merge --dry-run`` prints what it resolved (``describe_plan``). Then the passes,
each streaming tensor by tensor, chunk by chunk, through one loader with one-ahead prefetch:
1. scope="model" with a top-k/band/FFG sparsifier: level-0 histograms of every tensor, added
   into one per-model histogram, then one level-1 pass over the whole model.
2. LiNeS alpha="auto": the merge at lambda = 1, L = 1 in float32, accumulating
   ||sum_i t_i||_1 and ||merged||_1 over the whole model; alpha = the first / (N * second).
   The per-tensor plans of this pass are kept and reused by the merge pass.
3. The merge: per tensor, the plan's own pre-passes (planner.py: selection, statistics) over
   its chunks, then the fused pass, each output chunk written at its offset in the shard by a
   writer thread while the next one is computed (two outputs in flight).

What a kernels object provides (both classes implement all of it):
- ``name``, ``device``, ``chunking_name`` (the cost model of budget.plan_chunking),
  ``merge_pass_label``, ``dist`` (the process-group seam: parallel.py, or ``SingleProcess``);
- ``bind(inputs)``, ``configure(chunking, out_chunk_bytes)``, ``start()``, ``close()``,
  ``peak_gpu()``;
- ``load(name, start, stop, only_reference)`` -> a chunk with ``.offset``;
- the planner's ``one_pass``, ``radix``, ``stats`` (planner.py) and ``level0``;
- ``merge(chunk, plan, out_st, slot)`` -> (output, per-model NaN/Inf counts): the fused pass
  of a planner.RowPlan into output ``slot`` (0 or 1: a buffer whose write has finished);
- ``write(writer, name, offset, output)``, ``write_copy(writer, name, offset, chunk)``,
  ``chunk_numel(chunk)``, ``nonfinite_of(output, out_st)`` (report.nonfinite_in's answer: the
  count a kernel's store took where it reported one, else a pass over the output);
- ``lines_sums(chunk, plan)`` -> (||sum_i t_i||_1, ||merged - base||_1) of one chunk;
- ``reduce_floats(values)``: summed over ranks.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from ..checkpoint.safetensors_file import NAME_TO_ST, ST_SIZES, CheckpointError
from ..methods.kernel_params import pass_ids
from ..output.report import (
    MergeResult,
    NonFiniteCheck,
    NonFiniteOutput,
    apply_lines,
    default_budget,
    describe,
    peak_rss_bytes,
    progress_factory,
    write_extras,
)
from ..output.writer import AtomicDirectory, ShardLayout, ShardWriter
from ..planning.planner import SELECTING, RowPlan, plan_rows, select_thresholds
from ..planning.thresholds import nonfinite_error
from ..recipe.config import ConfigError, MergeConfig, ParameterResolver, load_config
from . import reduce_state
from .budget import (
    Chunking,
    element_ranges,
    plan_chunking,
    release_freed_memory_promptly,
    release_heap_pages,
    trim_freed_memory,
)
from .inputs import Inputs, merge_settings, name_files
from .method_pass import merge_tensor as merge_mergekit_tensor
from .sliced import close_inputs, open_merge_inputs


# ----------------------------------------------------------------------------- one process
@dataclass
class Partition:
    names: list                                  # this rank's tensors, in merge order
    rows: dict = field(default_factory=dict)     # split tensor -> this rank's (row0, row1)


class SingleProcess:
    """parallel.py's seam for one process, without torch."""

    @staticmethod
    def world():
        return 0, 1

    @staticmethod
    def partition(names, sizes, shapes, rank, world_size):
        return Partition(list(names))

    @staticmethod
    def local_ranges(shape, chunk_elems, rows):
        return element_ranges(shape, chunk_elems)

    @staticmethod
    def reducer(name=None):
        return None

    @staticmethod
    def allreduce_histograms(hist, n_models=None):
        return hist

    @staticmethod
    def output_directory(target, overwrite=False):
        return AtomicDirectory(target, overwrite)

    @staticmethod
    def shard_writer(layout, directory):
        return ShardWriter(layout, directory)

    @staticmethod
    def is_index_writer(rank):
        return True

    @staticmethod
    def shutdown():
        pass


# ----------------------------------------------------------------------------- streaming
def prefetched(items: Sequence, load: Callable, pool: ThreadPoolExecutor,
               first: Optional[Future] = None, then: Optional[Callable] = None) -> Iterator:
    """Yield load(item) for each item, loading the next one in ``pool`` meanwhile; ``first``:
    the first item's load, submitted already; ``then()`` is called once the last item's load
    is submitted, before the item before it is yielded."""
    if not items:
        return
    fut: Optional[Future] = first if first is not None else pool.submit(load, items[0])
    try:
        for k in range(len(items)):
            cur = fut.result()
            fut = pool.submit(load, items[k + 1]) if k + 1 < len(items) else None
            if k + 2 == len(items) and then is not None:
                then()
            yield cur
            del cur
    finally:
        if fut is not None:
            fut.cancel()
            try:
                fut.result()
            except BaseException:
                pass


class _TensorChunks:
    """The chunks of one tensor of several, ``src()`` once per pass, loaded one ahead in
    ``pool``. The first pass takes its first chunk from ``first`` (read ahead while the tensor
    before was merged) and calls ``then()`` once it has asked for its last chunk: the next
    tensor's first read, queued behind it, so at most three chunks are loaded at once (this
    one, the next of this tensor, the next tensor's first), as budget.plan_chunking counts."""

    def __init__(self, units: Sequence, load: Callable, pool: ThreadPoolExecutor,
                 first: Optional[Future], then: Callable, again: ThreadPoolExecutor,
                 whole_unit: Optional[tuple] = None):
        self.units, self.load, self.pool = list(units), load, pool
        self.first, self.then, self.again = first, then, again
        self.whole_unit = whole_unit
        # the planner's one-pass top-k reads ``whole()`` where given (planner.select_thresholds)
        self.whole = self._whole if whole_unit is not None else None

    def _whole(self) -> list:
        """The whole tensor as one chunk, for a first pass that needs it whole (the one-pass
        top-k, as at a budget where the tensor is one chunk); given only where it takes at most
        two chunks, so with the next tensor's first chunk three are loaded at once. The first
        chunk read ahead is let go (its pages are in the page cache: mapped again here)."""
        self.first = None
        if self.then is None:
            return [self.again.submit(self.load, self.whole_unit).result()]
        fut = self.pool.submit(self.load, self.whole_unit)
        self.then, then = None, self.then
        then()
        return [fut.result()]

    def __call__(self) -> Iterator:
        return self._chunks()

    def _chunks(self) -> Iterator:
        # a later pass reads again what the first one just read (from the page cache): on
        # its own thread, not queued behind the next tensor's read from disk
        pool = self.pool if self.then is not None else self.again
        first, self.first = self.first, None
        yield from prefetched(self.units, self.load, pool, first,
                              self._then if self.then is not None else None)

    def _then(self) -> None:
        if self.then is not None:
            self.then, then = None, self.then
            then()


def read_whole_for_topk(r, kernels, name: str) -> bool:
    """Whether merged tensor ``name`` offers itself whole (at most two chunks) to the planner's
    one-pass top-k (_TensorChunks.whole): on the CPU kernels (its copies stay within a chunk's
    scratch allowance), on mapped bytes (no staging buffer), not split over ranks. The merge
    and its dry run (dry_run.py) ask this one question."""
    return kernels.name == "cpu" and str(kernels.device) == "cpu" and name not in r.rows and \
        r.inputs.reference.info(name).numel <= 2 * r.chunking.chunk_elems


def processing_order(names: Sequence, nbytes: Callable, split=()) -> list:
    """The merge pass's order: the tensors in ``split`` (split over ranks) first, in the given
    order, then the others largest first (ties in output order), so the last ones, whose
    compute and write nothing follows to overlap, are the smallest (a Llama's lm_head came
    last: its whole merge and write were the run's tail). Every tensor is merged on its own and
    written at its place in the layout, so the bytes do not depend on the order, except that a
    split tensor's thresholds are summed over the ranks and collectives pair up by call order,
    not by tensor: every rank must reach the split tensors in one sequence (their bytes on a
    rank, by which they would sort, differ between ranks when the rows do not divide evenly)."""
    first = [x for x in names if x in split]
    return first + sorted((x for x in names if x not in split), key=lambda x: -nbytes(x))


class _Writes:
    """A writer thread with two output slots: a slot is handed out once its last write has
    finished, so at most two outputs are in flight (one written, one computed)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fastmerge-write")
        self.pending: list = [None, None]
        self.turn = 0

    def slot(self) -> int:
        k = self.turn
        self.turn ^= 1
        if self.pending[k] is not None:
            f, self.pending[k] = self.pending[k], None
            f.result()
        return k

    def submit(self, k: int, fn, *args) -> None:
        self.pending[k] = self.pool.submit(fn, *args)

    def flush(self) -> None:
        for k in (0, 1):
            if self.pending[k] is not None:
                f, self.pending[k] = self.pending[k], None
                f.result()

    def close(self) -> None:
        # on failure too: no write may still run when the caller closes the shard files
        wait([f for f in self.pending if f is not None])
        self.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- resolution
@dataclass
class Resolved:
    """Everything a merge resolves before reading any weight."""
    cfg: MergeConfig
    inputs: Inputs
    out_dir: Path
    shard_bytes: int
    resolver: ParameterResolver
    base_specs: dict               # merged tensor -> MergeSpec (before LiNeS)
    out_st: dict                   # tensor -> output safetensors dtype code
    chunking: Chunking
    mine: list                     # this rank's tensors, in output order
    rows: dict                     # tensor split over ranks -> this rank's rows
    rank: int = 0

    @property
    def my_merged(self) -> list:
        return [x for x in self.mine if x in self.base_specs]

    @property
    def alpha_auto(self) -> bool:
        return self.cfg.lines is not None and self.cfg.lines.alpha == "auto"

    @property
    def model_scope(self) -> bool:
        spec0 = next(iter(self.base_specs.values()), None)
        return self.cfg.scope == "model" and spec0 is not None and \
            spec0.sparsifier in SELECTING


def _all_sources(inputs: Inputs, name: str) -> list:
    base, models = inputs.sources(name)
    return ([base] if base is not None else []) + list(models)


def resolve(cfg: MergeConfig, inputs: Inputs, *, chunking_name: str, device: str, dist,
            budget: int, out_dir: Path, shard_bytes: int, seed=None, lines_pattern=None,
            max_chunk_elems=None) -> Resolved:
    """Every tensor's parameters, the output dtypes, the chunk size and this rank's tensors:
    config errors come here, before any weight is read."""
    rank, world_size = dist.world()
    resolver = inputs.plan.resolver(seed) if inputs.plan is not None else \
        ParameterResolver(cfg, inputs.order, seed=seed, pattern=lines_pattern)
    merged, ref, n = inputs.merged, inputs.reference, len(inputs.models)
    base_specs = {x: resolver.spec_for(x) for x in merged}
    out_st = {x: NAME_TO_ST[cfg.output_dtype] if cfg.output_dtype else ref.info(x).st
              for x in merged}
    out_st.update({x: ref.info(x).st for x in inputs.copied})
    info = cfg.info
    # each input's own dtype (mixed inputs: a float32 model beside a bfloat16 base)
    in_per_elem = max([sum(c.info(t).itemsize for c, t in _all_sources(inputs, x))
                       for x in merged] or [(n + 1) * 2]) + \
        (n * 4 if info.needs_second_moments else 0)
    alpha_auto = cfg.lines is not None and cfg.lines.alpha == "auto"
    state = reduce_state.point_state(cfg, inputs, base_specs)
    chunking = plan_chunking(budget, chunking_name, n, in_per_elem,
                             max([ST_SIZES[out_st[x]] for x in merged] or [4]),
                             extra_work=(12 if alpha_auto else 0) + state.work, device=str(device),
                             sparsifier=info.sparsifier, combine=info.combine,
                             reserved=state.peak,
                             why=reduce_state.describe(state))
    if max_chunk_elems is not None:
        chunking.chunk_elems = max(1, min(chunking.chunk_elems, int(max_chunk_elems)))
    # a mergekit method's reductions span the whole tensor: its tensors stay whole per rank
    # (a 0-d shape is never split)
    part = dist.partition(inputs.order, {x: ref.info(x).nbytes for x in inputs.order},
                          {x: () if cfg.is_mergekit_method else ref.info(x).shape
                           for x in inputs.order}, rank, world_size)
    res = Resolved(cfg, inputs, out_dir, shard_bytes, resolver, base_specs, out_st, chunking,
                   part.names, part.rows, rank)
    if res.model_scope:
        spec0 = base_specs[merged[0]]
        for x in merged:
            s = base_specs[x]
            if s.densities != spec0.densities or s.gammas != spec0.gammas:
                raise ConfigError(f"scope: model needs one density (and gamma) per model "
                                  f"over the whole model, but tensor {x!r} resolves to "
                                  f"density {list(s.densities)} vs {list(spec0.densities)}")
    return res


# ----------------------------------------------------------------------------- the passes
class _Passes:
    def __init__(self, r: Resolved, kernels, progress, nonfinite: NonFiniteCheck):
        self.r, self.k, self.progress, self.nonfinite = r, kernels, progress, nonfinite
        self.inputs = r.inputs
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="fastmerge-read")
        # a tensor's later passes read on their own thread (_TensorChunks); on a GPU the
        # loads share one pinned staging buffer (streaming.ChunkLoader): one thread then
        self.rereader = self.reader if str(kernels.device) != "cpu" else \
            ThreadPoolExecutor(1, thread_name_prefix="fastmerge-reread")
        self.plans: dict = {}
        self.passes: list = []

    def close(self):
        self.reader.shutdown(wait=True, cancel_futures=True)
        if self.rereader is not self.reader:
            self.rereader.shutdown(wait=True, cancel_futures=True)

    def units(self, name):
        shape = self.inputs.reference.info(name).shape
        return [(name, s, e) for s, e in
                self.k.dist.local_ranges(shape, self.r.chunking.chunk_elems,
                                         self.r.rows.get(name))]

    def reduce(self, name):
        """The planner's reduce for a tensor split over ranks (it checks that every rank
        reduces this tensor), else None."""
        return self.k.dist.reducer(name) if name in self.r.rows else None

    def load(self, unit, only_reference=False):
        name, s, e = unit
        if self.copies_chunks:   # the copies freed since the last load leave the heaps
            release_heap_pages()
        return self.k.load(name, s, e, only_reference)

    @property
    def copies_chunks(self) -> bool:
        """Whether an input's chunks are copies (.bin, LoRA) rather than mapped views."""
        return any(getattr(c, "copies_chunks", False)
                   for c in [self.inputs.base, *self.inputs.models] if c is not None)

    def source(self, units, only_reference=False):
        return lambda: prefetched(units, lambda u: self.load(u, only_reference), self.reader)

    def tensor_sources(self, order, merged):
        """(name, is_merged, src) for each tensor of ``order`` in turn, ``src()`` its chunks
        (once per pass). Each tensor's first chunk is read ahead on the reader thread: a
        tensor of one chunk as soon as the one before is in hand, a tensor of several once
        the first pass over the one before has asked for its last chunk (_TensorChunks), so
        the reader is not idle while that tensor's last chunk and its later passes (the
        statistics or selection pass, then the merge) are computed. Close the generator when
        done (it cancels a read still pending)."""
        jobs = [(name, self.units(name), name not in merged) for name in order]
        ahead: dict = {}   # job index -> the future of its first chunk

        def read_ahead(j):
            if j < len(jobs) and j not in ahead:
                ahead[j] = self.reader.submit(self.load, jobs[j][1][0], jobs[j][2])
        read_ahead(0)
        try:
            for j, (name, units, only_reference) in enumerate(jobs):
                read_ahead(j)
                fut = ahead.pop(j)
                if len(units) == 1:
                    chunk = fut.result()
                    read_ahead(j + 1)
                    src = (lambda c: (lambda: [c]))(chunk)
                    del chunk
                else:
                    whole = not only_reference and read_whole_for_topk(self.r, self.k, name)
                    src = _TensorChunks(
                        units, partial(self.load, only_reference=only_reference), self.reader,
                        fut, partial(read_ahead, j + 1), self.rereader,
                        whole_unit=(name, units[0][1], units[-1][2]) if whole else None)
                del fut
                yield name, not only_reference, src
                del src
        finally:
            for fut in ahead.values():
                fut.cancel()

    def numel(self, name):
        return self.inputs.reference.info(name).numel

    def in_bytes(self, name):
        n = self.inputs.in_bytes(name)
        if name in self.r.rows:            # this rank's rows of a tensor split over ranks
            r0, r1 = self.r.rows[name]
            n = n * (r1 - r0) // max(1, int(self.inputs.reference.info(name).shape[0]))
        return n

    # --- pass 1: model-wide thresholds
    def model_thresholds(self, spec0, names):
        n = spec0.n_models
        score = pass_ids(spec0)["score"]
        hist = None
        bar = self.progress("scope=model: histograms", sum(self.in_bytes(x) for x in names))
        try:
            for name in names:
                try:
                    h = self.k.level0(self.source(self.units(name)), n, score, (name,))
                except CheckpointError:
                    raise
                except ValueError as exc:
                    raise name_files(exc, self.inputs, name) from None
                hist = h if hist is None else hist.add(h)
                bar.update(self.in_bytes(name))
        finally:
            bar.close()
        hist = self.k.dist.allreduce_histograms(hist, n)
        total = sum(self.numel(x) for x in self.inputs.merged)
        all_units = [u for x in names for u in self.units(x)]
        thr, _, _, _ = select_thresholds(spec0, total, self.k, self.source(all_units), names,
                                         self.k.dist.reducer(), l1=False, hist=hist)
        self.passes += ["scope=model level-0 histograms", "scope=model level-1 selection"]
        return [tuple(t) for t in thr], total

    # --- pass 2: LiNeS alpha = ||sum_i t_i||_1 / (N ||merged||_1)
    def lines_alpha(self, names, thresholds):
        n = len(self.inputs.models)
        sums = [0.0, 0.0]
        bar = self.progress("LiNeS alpha=auto", sum(self.in_bytes(x) for x in names))
        try:
            for name in names:
                spec = dataclasses.replace(self.r.resolver.spec_for(name), lambda_=1.0,
                                           lines_factor=1.0)
                src = self.source(self.units(name))
                try:
                    plan = plan_rows(spec, self.numel(name), name, self.k, src, thresholds,
                                     self.reduce(name))
                    self.plans[name] = plan
                    for ch in src():
                        task, merged = self.k.lines_sums(ch, plan)
                        sums[1] += merged
                        sums[0] += task
                        del ch
                except CheckpointError:
                    raise
                except ValueError as exc:
                    raise name_files(exc, self.inputs, name) from None
                bar.update(self.in_bytes(name))
        finally:
            bar.close()
        sums = self.k.reduce_floats(sums)
        self.passes.append("LiNeS alpha=auto statistics (merge at lambda=1, L=1)")
        if sums[1] == 0:
            return 1.0, sums
        return sums[0] / (n * sums[1]), sums

    # --- pass 3: the merge
    def merge(self, order, specs, writer, thresholds, bar):
        k = self.k
        writes = _Writes()
        order = processing_order(order, self.in_bytes, self.r.rows)
        sources = self.tensor_sources(order, set(specs))
        copies = self.copies_chunks
        try:
            for j, (name, is_merged, src) in enumerate(sources):
                if not is_merged:
                    for ch in src():
                        slot = writes.slot()
                        writes.submit(slot, k.write_copy, writer, name, ch.offset, ch)
                        del ch
                else:
                    try:
                        self.merge_tensor(name, specs[name], src, writer, writes, thresholds)
                    except (CheckpointError, NonFiniteOutput):
                        raise
                    except ValueError as exc:
                        raise name_files(exc, self.inputs, name) from None
                del src
                if copies:   # their freed copies stay in the reader threads' heaps
                    release_heap_pages()
                bar.update(self.in_bytes(name))
                bar.set_postfix_str(f"{j + 1}/{len(order)} tensors", refresh=False)
            writes.flush()
        finally:
            sources.close()
            writes.close()
        self.passes.append(k.merge_pass_label)

    def merge_tensor(self, name, spec, src, writer, writes, thresholds):
        if self.r.cfg.is_mergekit_method:   # reductions + apply, by what the method declares
            return merge_mergekit_tensor(self, name, spec, src, self.units(name), writer, writes)
        k = self.k
        plan: Optional[RowPlan] = self.plans.pop(name, None)
        if plan is None:
            plan = plan_rows(spec, self.numel(name), name, k, src, thresholds,
                             self.reduce(name))
        else:   # the alpha=auto pass's plan, with this spec's LiNeS factor
            plan = dataclasses.replace(plan, spec=spec, compiled={})
        st = self.r.out_st[name]
        for ch in src():
            off, stop = ch.offset, ch.offset + k.chunk_numel(ch)
            slot = writes.slot()
            out, bad = k.merge(ch, plan, st, slot)
            del ch
            for i, c in enumerate(bad):
                if c:
                    raise nonfinite_error(i, int(c), (name,))
            writes.submit(slot, self.write_checked, writer, name, off, stop, st, out)
            del out

    def write_checked(self, writer, name, start, stop, st, out):
        """In the writer thread: finite inputs can still overflow the output dtype, so each
        merged chunk is checked for NaN/Inf (while the next one merges), then written."""
        self.nonfinite.found_in(name, start, stop, self.numel(name), st,
                                self.k.nonfinite_of(out, st))
        self.k.write(writer, name, start, out)


# ----------------------------------------------------------------------------- the driver
def merge(config, out_dir, make_kernels: Callable, *, memory_budget=None, shard_size="5GB",
          seed: Optional[int] = None, overwrite: bool = False, quiet: bool = True,
          lines_pattern: Optional[str] = None, max_chunk_elems: Optional[int] = None,
          allow_nonfinite: bool = False, local_world_size: int = 1,
          t0: Optional[float] = None) -> MergeResult:
    """Merge whole checkpoints as ``config`` says into ``out_dir`` with the kernels
    ``make_kernels()`` returns (called after the settings are checked); the arguments are
    ``merge_checkpoints``'."""
    t0 = time.perf_counter() if t0 is None else t0
    release_freed_memory_promptly()
    try:
        with resolved_merge(config, out_dir, make_kernels, memory_budget=memory_budget,
                            shard_size=shard_size, seed=seed, overwrite=overwrite,
                            lines_pattern=lines_pattern, max_chunk_elems=max_chunk_elems,
                            local_world_size=local_world_size) as (r, k, _):
            res = _run(r, k, overwrite, quiet, t0, NonFiniteCheck(allow_nonfinite))
            k.dist.shutdown()
            return res
    finally:
        trim_freed_memory()


@contextmanager
def resolved_merge(config, out_dir, make_kernels: Callable, *, memory_budget, shard_size, seed,
             overwrite: bool, lines_pattern, max_chunk_elems, local_world_size: int,
             open_headers=None):
    """What a merge and its dry run start with: the settings checked, ``make_kernels()``
    bound to the inputs (``open_headers``: the dry run's, sliced.open_headers_only with its
    note; else open_merge_inputs, resolved on the headers first where a hub model would be
    downloaded), the merge resolved; yields (Resolved, kernels, memory budget), then closes
    the inputs and the kernels."""
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    out_dir, budget, shard_bytes = merge_settings(cfg, out_dir, overwrite, memory_budget,
                                                  shard_size, lines_pattern,
                                                  default_budget() // local_world_size)
    k = make_kernels()

    def resolved(inputs):
        return resolve(cfg, inputs, chunking_name=k.chunking_name, device=k.device,
                       dist=k.dist, budget=budget, out_dir=out_dir, shard_bytes=shard_bytes,
                       seed=seed, lines_pattern=lines_pattern, max_chunk_elems=max_chunk_elems)
    try:
        inputs = open_headers(cfg, cfg.info.needs_second_moments) if open_headers else \
            open_merge_inputs(cfg, cfg.info.needs_second_moments, precheck=resolved)
        try:
            k.bind(inputs)
            yield resolved(inputs), k, budget
        finally:
            close_inputs(inputs)
    finally:
        k.close()


@dataclass
class Prepared:
    """A merge's model-wide results before its merge pass, and its output's layout."""
    thresholds: Optional[list]     # scope=model thresholds, else None
    specs: dict                    # merged tensor -> MergeSpec (LiNeS applied)
    resolved: dict
    per_tensor: dict
    config_text: str
    layout: ShardLayout


def prepare(r: Resolved, k, eng: "_Passes") -> Prepared:
    """Passes 1 and 2 (model-wide thresholds, LiNeS alpha) and the output's layout and
    metadata, known only after them; the sweep (sweep.py) runs this per point."""
    cfg, inputs, merged = r.cfg, r.inputs, r.inputs.merged
    thresholds, model_info = None, {}
    if r.model_scope:
        thresholds, total = eng.model_thresholds(r.base_specs[merged[0]], r.my_merged)
        model_info = {"model_thresholds": [list(t) for t in thresholds],
                      "model_elements": total}
    alpha, auto_info = cfg.lines.alpha if cfg.lines is not None else None, {}
    if r.alpha_auto:
        alpha, sums = eng.lines_alpha(r.my_merged, thresholds)
        auto_info = {"alpha_auto_l1": {"sum_task_vectors": sums[0], "merged": sums[1]}}
    specs, lines_info = apply_lines(cfg, inputs.order, merged, r.base_specs, alpha)
    lines_info = {**auto_info, **lines_info}
    resolved, per_tensor, config_text, st_meta = describe(
        cfg, inputs, k.name, str(k.device), specs,
        {**model_info, **({"lines": lines_info} if lines_info else {})})
    layout = ShardLayout([(x, inputs.reference.info(x).shape, r.out_st[x])
                          for x in inputs.order], r.shard_bytes, st_meta)
    return Prepared(thresholds, specs, resolved, per_tensor, config_text, layout)


def out_chunk_bytes(r: Resolved) -> int:
    return r.chunking.chunk_elems * max([ST_SIZES[r.out_st[x]] for x in r.inputs.merged] or [4])


def _run(r: Resolved, k, overwrite: bool, quiet: bool, t0: float,
         nonfinite: NonFiniteCheck) -> MergeResult:
    cfg, inputs = r.cfg, r.inputs
    k.configure(r.chunking, out_chunk_bytes(r))
    progress = progress_factory(quiet or r.rank != 0)
    eng = _Passes(r, k, progress, nonfinite)
    k.start()
    try:
        p = prepare(r, k, eng)
        layout = p.layout
        with k.dist.output_directory(r.out_dir, overwrite) as adir:
            writer = k.dist.shard_writer(layout, adir.tmp)
            try:
                bar = progress("merging", sum(eng.in_bytes(x) for x in r.mine))
                try:
                    eng.merge(r.mine, {x: p.specs[x] for x in r.my_merged}, writer,
                              p.thresholds, bar)
                finally:
                    bar.close()
                writer.close(check=True)
            finally:
                writer.close()
            nonfinite.found = {x: nonfinite.found[x] for x in r.mine if x in nonfinite.found}
            if k.dist.is_index_writer(r.rank):
                write_extras(adir.tmp, layout, cfg, inputs, p.resolved, p.per_tensor,
                             p.config_text)
            final = adir.commit()
        nonfinite.warn()
    finally:
        eng.close()
    resolved = p.resolved
    return MergeResult(
        output_dir=final, method=cfg.method_as_written if cfg.passthrough else cfg.method,
        backend=k.name, device=str(k.device),
        tensors=len(r.mine), shards=layout.count, bytes_in=sum(eng.in_bytes(x) for x in r.mine),
        bytes_out=layout.total_size, seconds=time.perf_counter() - t0,
        peak_rss=peak_rss_bytes(), peak_gpu=k.peak_gpu(), chunk_elems=r.chunking.chunk_elems,
        passes=eng.passes, resolved=resolved, nonfinite=nonfinite.found)
