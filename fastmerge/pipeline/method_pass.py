"""One tensor of a mergekit method (fastmerge/methods/mergekit_methods.py) through the pipeline,
by what the method declares, never by its name:

- a method whose job is one linear combination per tensor (``Method.combination``: slerp,
  multislerp, karcher, model_stock, nuslerp over the whole tensor, passthrough) takes a
  reduction pre-pass (the float64 Gram matrix of its inputs or task vectors, streamed over the
  chunks in sub-blocks), then its coefficients c and the kernels' fused weighted sum
  ``out = sum_k c_k V_k`` (the ``linear`` combine with the base as one more weighted input, no
  normalisation): the same C++ kernels as every method, and on CoreKernels without torch;
- della and della_linear run the fused C++ kernel (della_pass.py: ranks, Philox masks, L1
  rescale and the combine in one pass over whole rows, torch-free on CoreKernels);
- any other method runs its float32 reference (``reduce`` over the chunks, then ``apply`` per
  chunk) through torch, imported then; inputs are converted in sub-blocks, so the reference
  never holds N float32 copies of a whole tensor (della's ranks need whole rows: chunks are
  whole rows).

Every output chunk then takes the usual NaN/Inf check and write (driver.write_checked).
"""
from __future__ import annotations

import dataclasses
import math

from ..methods import resolve_spec
from ..methods.core import Chunk as RefChunk
from ..methods.core import Job, Method, check_finite, gram_matrix
from ..methods.mergekit_methods import MERGEKIT_METHODS
from ..planning.planner import plan_rows
from . import della_pass
from .budget import element_ranges, release_heap_pages

SUB_ELEMS = 1 << 20   # elements per sub-block: bounds the float32/float64 temporaries


def units_for(passes, name: str, method, job: Job, units: list) -> list:
    """The driver's chunks if they fall on the method's alignment (whole rows for row math),
    else chunks of whole rows (a row larger than the budget is then one chunk)."""
    align = method.align(job)
    if align <= 1 or all(s % align == 0 for _, s, _ in units):
        return units
    shape = job.shape
    row = math.prod(shape[1:]) if len(shape) > 1 else max(1, math.prod(shape))
    elems = max(passes.r.chunking.chunk_elems, align, row)
    return [(name, s, e) for s, e in element_ranges(shape, elems)]


def merge_tensor(passes, name, spec, src, units, writer, writes) -> None:
    """Merge tensor ``name`` (a recipe.mergekit_params.MergekitSpec) into ``writer``."""
    merge_points([Point(passes, name, spec, units, writer, writes)], name, units, src,
                 passes.source)


class Point:
    """One merge (a sweep point, or the merge) of one tensor: what its method declares, and
    its phases (Gram pre-pass, reduction, apply per chunk) for ``merge_points`` to drive."""

    def __init__(self, passes, name, spec, units, writer, writes):
        method = MERGEKIT_METHODS[spec.method]
        self.passes, self.name, self.method, self.writer, self.writes = \
            passes, name, method, writer, writes
        inputs = passes.inputs
        shape = tuple(int(s) for s in inputs.reference.info(name).shape)
        base, models = inputs.sources(name)   # a slice's route, or the same name everywhere
        self.n_models = len(models)
        self.first = models[0] if models else None
        self.with_base = base is not None and method.schema.base != "ignored"
        has_base, n = method.view(base is not None, len(models))
        self.job = Job(shape, spec.params, name, spec.seed, has_base, n)
        self.units = units_for(passes, name, method, self.job, units)
        # CoreKernels' chunks are bytes (it converts them with to_torch); TorchKernels' tensors
        self.ops = CoreOps(passes.k) if hasattr(passes.k, "to_torch") else TorchOps(passes.k)
        self.st = passes.r.out_st[name]
        self.comb = method.combination(self.job)
        self.della = None if self.comb is not None else \
            della_pass.point(passes, method, name, self.job, base, models)
        self.subs = self.stats = self.coeffs = self.plan = None
        self.copy = False

    @property
    def gram_key(self):
        """Points with the same key take the same Gram matrix (of the same inputs)."""
        if self.comb is None or self.comb.gram is None:
            return None
        return self.comb.gram == "tasks", self.with_base

    def set_gram(self, gram, src) -> None:
        """The coefficients from the Gram matrix (None: the method needs none) and the plan of
        the fused weighted sum, or a copy of the one input."""
        name, job = self.name, self.job
        if gram is not None and not all(math.isfinite(x) for row in gram for x in row):
            bad = next(i for i in range(len(gram)) if not math.isfinite(gram[i][i]))
            raise _nonfinite(name, _which(bad, self.n_models))
        coeffs = [float(c) for c in self.comb.coefficients(gram)]
        if not all(math.isfinite(c) for c in coeffs):
            raise ValueError(f"tensor {name!r}: {job_label(job)} gave non-finite coefficients "
                             f"{coeffs}")
        self.coeffs = coeffs
        first = self.first
        self.copy = coeffs == [1.0] and not self.with_base and first is not None and \
            first[0].info(first[1]).st == self.st
        if not self.copy:
            spec = resolve_spec("linear", len(coeffs), weights=coeffs, normalize=False)
            self.plan = plan_rows(spec, math.prod(job.shape), name, self.passes.k, src)

    def reducer(self):
        """A callable taking the tensor's chunks (re-iterable) and keeping what this point's
        apply needs, or None where nothing is gathered over the whole tensor."""
        if self.comb is not None:
            return None
        if self.della is not None:
            return self.della.reduce
        if type(self.method).reduce is Method.reduce:
            return None
        return self._reduce

    def _reduce(self, chunks) -> None:
        self.subs = _Sub(self.ops, self.method, self.job, self.with_base, lambda: chunks,
                         self.n_models)
        self.stats = self.method.reduce(self.job, self.subs)

    def apply(self, ch) -> None:
        """This point's output of chunk ``ch``, handed to its writer."""
        passes, name, st = self.passes, self.name, self.st
        off, stop = ch.offset, ch.offset + passes.k.chunk_numel(ch)
        if self.della is not None:
            slot = self.writes.slot()
            out = self.della.apply(ch, slot)
        elif self.comb is None:
            if self.subs is None:
                self.subs = _Sub(self.ops, self.method, self.job, self.with_base, None,
                                 self.n_models)
            import torch
            out = torch.cat([self.method.apply(self.job, c, self.stats).reshape(-1)
                             for c in self.subs.of(ch)])
            slot = self.writes.slot()
            out = self.ops.output(out, st)
        elif self.copy:   # one input taken whole (passthrough): its bytes are the output
            out = ch.models[0]
            slot = self.writes.slot()
        else:
            slot = self.writes.slot()
            out, bad = passes.k.merge(self.ops.weighted_inputs(ch, self.with_base), self.plan,
                                      st, slot)
            for i, c in enumerate(bad):
                if c:
                    raise _nonfinite(name, _which(i, self.n_models))
        del ch
        self.writes.submit(slot, passes.write_checked, self.writer, name, off, stop, st, out)


def merge_points(points: list, name: str, units: list, src, source, also=None) -> None:
    """Merge tensor ``name`` for every point of ``points`` (a sweep's, or the merge's one)
    from shared reads: points on the same chunks (``units``, read by ``src``; others by
    ``source(their units)``) take one read per round feeding every Gram matrix they need and
    every reduction (fan_out), then one read of each chunk feeding every point's apply (and
    ``also(chunk)``, on ``units``' chunks: the sweep's other points). So a tensor is read at
    most twice (pre-pass + apply) whatever the number of points; a reduction that reads the
    tensor twice itself (sce) makes it three."""
    della_pass.share_masks([p.della for p in points if p.della is not None],
                           points[0].passes.r.chunking)
    groups: dict = {tuple(units): []}
    for p in points:
        groups.setdefault(tuple(p.units), []).append(p)
    for key, pts in groups.items():
        main = list(key) == list(units)
        if not pts and not (main and also is not None):
            continue
        p_src = src if main else source(pts[0].units)
        fan_out(p_src, _gram_consumers(pts, p_src) +
                [r for r in (p.reducer() for p in pts) if r is not None])
        for ch in p_src():   # the one read of each chunk; every point's output from it
            for p in pts:
                p.apply(ch)
            if main and also is not None:
                also(ch)
            del ch
    if any(p.subs is not None for p in points):   # a float32 reference ran (torch)
        release_heap_pages()


def _gram_consumers(points: list, src) -> list:
    """One reduction per Gram matrix the points need (points with the same key share it);
    points needing none get their coefficients now."""
    keys: dict = {}
    for p in points:
        if p.comb is None:
            continue
        if p.gram_key is None:
            p.set_gram(None, src)
        else:
            keys.setdefault(p.gram_key, []).append(p)

    def consumer(key, pts):
        def gram_of(chunks):
            gram = None
            for ch in chunks:
                g = pts[0].ops.gram(ch, *key)
                gram = g if gram is None else \
                    [[a + b for a, b in zip(r, q)] for r, q in zip(gram, g)]
                del ch
            for p in pts:
                p.set_gram(gram, src)
        return gram_of
    return [consumer(k, pts) for k, pts in keys.items()]


class _Again:
    """``src``'s chunks, read again on each iteration."""

    def __init__(self, src):
        self.src = src

    def __iter__(self):
        return iter(self.src())


_END, _ABORT = object(), object()


class _Aborted(Exception):
    """The reader stopped (its error is the one raised)."""


def fan_out(src, consumers: list) -> None:
    """Run every ``consumer(chunks)`` (a reduction over the tensor's chunks, re-iterable) on
    one read of ``src`` per round: each consumer runs in its own thread on a queue the reader
    fills, one chunk ahead; a consumer that iterates again asks for another round. Their work
    on a chunk is serialised (one lock), so the scratch memory is one consumer's; so is the
    work after a round's last chunk, until the consumer asks for another round or returns (a
    gathering reduction's peak, reduce_state.py, is one consumer's at a time). One consumer
    runs on ``src`` directly."""
    if len(consumers) <= 1:
        for c in consumers:
            c(_Again(src))
        return
    import queue
    import threading
    status: queue.Queue = queue.Queue()
    feeds = [queue.Queue(maxsize=1) for _ in consumers]
    errors: list = [None] * len(consumers)
    work = threading.Lock()
    finishing = [False] * len(consumers)   # consumer j holds ``work`` after its round's end

    def end_finishing(j):
        if finishing[j]:
            finishing[j] = False
            work.release()

    def rounds(j):
        class Rounds:
            def __iter__(self):
                end_finishing(j)
                status.put((j, True))
                held, done = False, False
                try:
                    while True:
                        item = feeds[j].get()
                        if item is _END:
                            done = True
                            work.acquire()
                            finishing[j] = True
                            return
                        if item is _ABORT:
                            done = True
                            raise _Aborted
                        work.acquire()
                        held = True
                        yield item
                        del item
                        work.release()
                        held = False
                finally:
                    if held:
                        work.release()
                    while not done:   # left early: drain the round the reader feeds
                        done = feeds[j].get() in (_END, _ABORT)
        return Rounds()

    def run(j):
        try:
            consumers[j](rounds(j))
        except BaseException as exc:
            errors[j] = exc
        finally:
            end_finishing(j)
            status.put((j, False))

    threads = [threading.Thread(target=run, args=(j,), name="fastmerge-reduce", daemon=True)
               for j in range(len(consumers))]
    for t in threads:
        t.start()
    active = set(range(len(consumers)))
    ok = False
    try:
        while active:
            want = []
            for _ in range(len(active)):
                j, more = status.get()
                if more:
                    want.append(j)
                else:
                    active.discard(j)
            if not want:
                break
            try:
                for ch in src():
                    for j in want:
                        feeds[j].put(ch)
                    del ch
            finally:
                for j in want:
                    feeds[j].put(_END)
        ok = True
    finally:
        if not ok:   # the read failed: a consumer asking for another round stops there
            for j in active:
                feeds[j].put(_ABORT)
        for t in threads:
            t.join()
    for e in errors:
        if e is not None and not isinstance(e, _Aborted):
            raise e


def _nonfinite(name: str, which: str) -> ValueError:
    return ValueError(f"tensor {name!r}: {which} contains NaN/Inf value(s); fastmerge refuses "
                      f"to merge them")


def _which(i: int, n_models: int) -> str:
    return f"model {i}" if i < n_models else "the base model"


def job_label(job: Job) -> str:
    return f"parameters {job.params}"


class _Sub:
    """The reference's chunks of one tensor (re-iterable: ``reduce`` may read them twice):
    each kernels chunk as float32 sub-blocks, checked for NaN/Inf."""

    def __init__(self, ops, method, job, with_base, src, n_models):
        self.ops, self.method, self.job, self.with_base = ops, method, job, with_base
        self.src, self.n_models = src, n_models

    def of(self, ch):
        base, models = self.ops.float_inputs(ch, self.with_base)
        for i, m in enumerate(models):
            check_finite(m, self.job.name, f"model {i}")
        if base is not None:
            check_finite(base, self.job.name, "the base model")
        base, models = self.method.inputs(base, models)
        numel = models[0].numel() if models else base.numel()
        align = max(1, self.method.align(self.job))
        step = max(align, (SUB_ELEMS // align) * align)
        for s in range(0, max(numel, 1), step):
            yield RefChunk(ch.offset + s, None if base is None else base[s:s + step],
                           [m[s:s + step] for m in models])

    def __iter__(self):
        for ch in self.src():
            yield from self.of(ch)


# --------------------------------------------------------------------------- kernels' chunks
class CoreOps:
    """CoreKernels' chunks (read-only views of the mapped bytes): the Gram matrix in C++
    (fastmerge._core.gram, csrc/cpu/gram.cpp), read straight from the mapped bytes."""

    def __init__(self, k):
        self.k = k

    def gram(self, ch, tasks: bool, with_base: bool):
        """float64 Gram matrix of [models, base] (``tasks``: of models - base, the float32
        difference as the reference computes it) over the chunk, as nested lists (slerp's and
        model_stock's coefficients need no numpy, so their merge does not import it); the
        same bits for any thread count (per-block partial sums added in block order)."""
        base_code, codes = self.k._codes(ch)
        vecs = [*ch.models, ch.base] if with_base else list(ch.models)
        codes = [*codes, base_code] if with_base else codes
        size = len(vecs) - (1 if tasks else 0)
        g = self.k.core.gram(vecs, codes, tasks, ch.numel, self.k.nthreads)
        return [g[i * size:(i + 1) * size] for i in range(size)]

    @staticmethod
    def weighted_inputs(ch, with_base: bool):
        """The chunk as the linear combine's inputs: the models, then the base."""
        if not with_base:
            return dataclasses.replace(ch, base=None, base_st=None)
        return dataclasses.replace(ch, base=None, base_st=None, models=[*ch.models, ch.base],
                                   model_sts=[*ch.model_sts, ch.base_st])

    def float_inputs(self, ch, with_base: bool):
        t = self.k.to_torch(ch)
        base = t.base.reshape(-1).float() if with_base else None
        return base, [m.reshape(-1).float() for m in t.models]

    @staticmethod
    def output(out, st: str):
        import torch

        from ..checkpoint.safetensors_file import torch_dtypes
        return out.to(torch_dtypes()[st]).contiguous().view(torch.uint8).numpy()


class TorchOps:
    """TorchKernels' chunks (torch tensors on the merge's device)."""

    def __init__(self, k):
        self.k = k

    @staticmethod
    def gram(ch, tasks: bool, with_base: bool):
        """The Gram matrix as nested lists of floats, as CoreOps'."""
        return gram_matrix(ch.models, ch.base if with_base else None, tasks, SUB_ELEMS).tolist()

    @staticmethod
    def weighted_inputs(ch, with_base: bool):
        """The chunk as the linear combine's inputs: the models, then the base."""
        models = [*ch.models, ch.base] if with_base else list(ch.models)
        return dataclasses.replace(ch, base=None, models=models)

    @staticmethod
    def float_inputs(ch, with_base: bool):
        base = ch.base.reshape(-1).float().cpu() if with_base else None
        return base, [m.reshape(-1).float().cpu() for m in ch.models]

    @staticmethod
    def output(out, st: str):
        from ..checkpoint.safetensors_file import torch_dtypes
        return out.to(torch_dtypes()[st])
