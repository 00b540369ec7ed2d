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
from ..methods.core import Job, check_finite, gram_matrix
from ..methods.mergekit_methods import MERGEKIT_METHODS
from ..planning.planner import plan_rows
from . import della_pass
from .budget import element_ranges

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
    method = MERGEKIT_METHODS[spec.method]
    inputs, k = passes.inputs, passes.k
    shape = tuple(int(s) for s in inputs.reference.info(name).shape)
    base, models = inputs.sources(name)   # a slice's route, or the same name everywhere
    with_base = base is not None and method.schema.base != "ignored"
    has_base, n = method.view(base is not None, len(models))
    job = Job(shape, spec.params, name, spec.seed, has_base, n)
    mine = units_for(passes, name, method, job, units)
    if mine is not units:
        src = passes.source(mine)
    # CoreKernels' chunks are bytes (it converts them with to_torch); TorchKernels' are tensors
    ops = CoreOps(k) if hasattr(k, "to_torch") else TorchOps(k)
    comb = method.combination(job)
    if comb is not None:
        _linear(passes, ops, name, job, comb, with_base, src, writer, writes)
    else:
        _reference(passes, ops, method, name, job, with_base, src, writer, writes)


def _nonfinite(name: str, which: str) -> ValueError:
    return ValueError(f"tensor {name!r}: {which} contains NaN/Inf value(s); fastmerge refuses "
                      f"to merge them")


def _which(i: int, n_models: int) -> str:
    return f"model {i}" if i < n_models else "the base model"


def _linear(passes, ops, name, job, comb, with_base, src, writer, writes) -> None:
    models = passes.inputs.sources(name)[1]
    first, n_models = models[0], len(models)
    gram = None
    if comb.gram is not None:
        for ch in src():
            g = ops.gram(ch, comb.gram == "tasks", with_base)
            gram = g if gram is None else [[a + b for a, b in zip(r, q)] for r, q in zip(gram, g)]
            del ch
        if not all(math.isfinite(x) for row in gram for x in row):
            bad = next(i for i in range(len(gram)) if not math.isfinite(gram[i][i]))
            raise _nonfinite(name, _which(bad, n_models))
    coeffs = [float(c) for c in comb.coefficients(gram)]
    if not all(math.isfinite(c) for c in coeffs):
        raise ValueError(f"tensor {name!r}: {job_label(job)} gave non-finite coefficients "
                         f"{coeffs}")
    st = passes.r.out_st[name]
    if coeffs == [1.0] and not with_base and first[0].info(first[1]).st == st:
        for ch in src():   # one input taken whole (passthrough): its bytes are the output
            off, stop = ch.offset, ch.offset + passes.k.chunk_numel(ch)
            out = ch.models[0]
            del ch
            slot = writes.slot()
            writes.submit(slot, passes.write_checked, writer, name, off, stop, st, out)
            del out
        return
    spec = resolve_spec("linear", len(coeffs), weights=coeffs, normalize=False)
    plan = plan_rows(spec, math.prod(job.shape), name, passes.k, src)
    for ch in src():
        off, stop = ch.offset, ch.offset + passes.k.chunk_numel(ch)
        slot = writes.slot()
        out, bad = passes.k.merge(ops.weighted_inputs(ch, with_base), plan, st, slot)
        del ch
        for i, c in enumerate(bad):
            if c:
                raise _nonfinite(name, _which(i, n_models))
        writes.submit(slot, passes.write_checked, writer, name, off, stop, st, out)
        del out


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


def _reference(passes, ops, method, name, job, with_base, src, writer, writes) -> None:
    if della_pass.merge(passes, method, name, job, src, writer, writes):
        return
    _reference_pass(passes, ops, method, name, job, with_base, src, writer, writes)


def _reference_pass(passes, ops, method, name, job, with_base, src, writer, writes) -> None:
    import torch
    n_models = len(passes.inputs.sources(name)[1])
    subs = _Sub(ops, method, job, with_base, src, n_models)
    stats = method.reduce(job, subs)
    st = passes.r.out_st[name]
    for ch in src():
        off, stop = ch.offset, ch.offset + passes.k.chunk_numel(ch)
        out = torch.cat([method.apply(job, c, stats).reshape(-1) for c in subs.of(ch)])
        del ch
        slot = writes.slot()
        out = ops.output(out, st)
        writes.submit(slot, passes.write_checked, writer, name, off, stop, st, out)
        del out


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
