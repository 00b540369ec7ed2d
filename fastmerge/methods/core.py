"""The shape every mergekit-method reference takes: a reduction pre-pass, then a per-element pass.

A tensor is read as flat float32 chunks (contiguous ranges of its row-major elements). A method
first gathers what it needs from the whole tensor (``reduce``: norms, dot products, Gram
matrices, counts, thresholds), then maps each chunk on its own (``apply``). ``merge`` runs
both over one tensor, in one chunk or many, which is the reference the tests compare against
mergekit and the streaming pipeline will reproduce chunk by chunk.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .lazy_torch import torch
from .schema import MethodSchema

# bytes per element of a reduction that gathers one float32 value per element of the tensor
# (a reference's exact quantiles: gather_values, then order_statistics in place)
GATHERED = 4


@dataclass
class Chunk:
    """Elements ``offset .. offset+len`` of one tensor, float32, flat, from every input."""
    offset: int
    base: torch.Tensor | None
    models: list[torch.Tensor]

    @property
    def numel(self) -> int:
        return (self.models[0] if self.models else self.base).numel()


@dataclass(frozen=True)
class Job:
    """One output tensor: its shape, resolved parameters, name (errors, random keys), seed."""
    shape: tuple[int, ...]
    params: dict
    name: str = "tensor"
    seed: int = 0
    has_base: bool = False
    n_models: int = 0    # non-base inputs (all inputs for karcher)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def check_finite(x: torch.Tensor, name: str, which: str) -> None:
    """NaN/Inf inputs stop the merge with one line naming the tensor and the input."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"tensor {name!r}: {which} contains {bad} NaN/Inf value(s); "
                         f"fastmerge refuses to merge them")


def rows_view(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, row length) of the vectors along the last dim; a 0-d or 1-D tensor is one row."""
    if len(shape) == 0:
        return 1, 1
    cols = shape[-1]
    return (math.prod(shape) // cols if cols else 0), cols


@dataclass(frozen=True)
class Combination:
    """What a method computes when its output is one linear combination of its inputs per
    tensor: out = sum_k c_k V_k, V the inputs as ``Method.inputs`` orders them (the non-base
    models in config order, then the base where the math reads it), c from the float64 Gram
    matrix of ``gram``: "inputs" (of V), "tasks" (of X_i - B) or None (no reduction).
    ``coefficients`` takes that Gram matrix (nested lists of float64 values, or None) and never
    needs torch, so the pipeline runs such a method through its fused weighted-sum kernels."""
    gram: str | None
    coefficients: Callable[[Any], Sequence[float]]


class Method:
    """A mergekit method's float32 reference as ``reduce`` (over all chunks) + ``apply``."""
    schema: MethodSchema
    passes = 1           # how many times ``reduce`` reads the chunks
    reductions = "none"  # what the pre-pass gathers, for the streaming pipeline

    @property
    def name(self) -> str:
        return self.schema.name

    def align(self, job: Job) -> int:
        """Chunk boundaries must fall on multiples of this many elements (a row, for row math)."""
        return 1

    def reduce(self, job: Job, chunks: Iterable[Chunk]) -> Any:
        """Statistics of the whole tensor; ``chunks`` is re-iterable when ``passes`` > 1."""
        return None

    def apply(self, job: Job, chunk: Chunk, stats: Any) -> torch.Tensor:
        raise NotImplementedError

    def state_bytes(self, job: Job) -> tuple[int, int]:
        """(held, peak): bytes ``reduce`` keeps while it reads the chunks of ``job``'s tensor,
        and at most while it finishes; the memory budget counts them (a sweep's points hold
        theirs at once). Only what grows with the tensor: a few float64 sums are not counted."""
        return 0, 0

    def work_bytes(self, job: Job) -> int | None:
        """Bytes per chunk element the float32 reference's ``reduce`` and ``apply`` hold at
        once (the chunk's float32 inputs, sub-block temporaries, float32 output), for the
        memory budget; None: within the allowance every mergekit method gets
        (pipeline/budget.py work_bytes_per_element)."""
        return None

    def combination(self, job: Job) -> Combination | None:
        """The per-tensor linear combination this job reduces to, or None where the output is
        not one (per-element weights, masks, per-row coefficients)."""
        return None

    def view(self, has_base: bool, n_models: int) -> tuple[bool, int]:
        """(base in the math, inputs in the math) for a base (or not) and N non-base models:
        karcher folds the base into its inputs, passthrough ignores it."""
        if not has_base or self.schema.base == "ignored":
            return False, n_models
        if self.schema.base == "input":
            return False, n_models + 1
        return True, n_models

    def inputs(self, base, models):
        """(base, models) as the math sees them; karcher folds the base into the inputs."""
        if self.schema.base == "input" and base is not None:
            return None, list(models) + [base]
        if self.schema.base == "ignored":
            return None, list(models)
        return base, list(models)

    def merge(self, base: torch.Tensor | None, models: Sequence[torch.Tensor],
              params: dict | None = None, *, name: str = "tensor", seed: int = 0,
              chunk_elems: int | None = None) -> torch.Tensor:
        """The merged tensor in float32, from inputs of any float dtype.

        ``models`` are the non-base inputs in config order. ``chunk_elems`` splits the tensor
        into chunks of about that many elements (rounded to ``align``) to show that chunked
        application equals whole-tensor application."""
        models = list(models)
        self.schema.check_inputs(base is not None, len(models))
        base, models = self.inputs(base, models)
        shape = tuple((models[0] if models else base).shape)
        for i, m in enumerate([base] + models if base is not None else models):
            if tuple(m.shape) != shape:
                raise ValueError(f"tensor {name!r}: input {i} has shape {tuple(m.shape)}, "
                                 f"input 0 {shape}")
            if not m.is_floating_point():
                raise ValueError(f"tensor {name!r}: {self.name} needs floating-point inputs, "
                                 f"input {i} is {m.dtype}")
        params = self.schema.resolve(params, len(models))
        job = Job(shape, params, name, seed, base is not None, len(models))
        flat_base = None
        if base is not None:
            flat_base = base.reshape(-1).float()
            check_finite(flat_base, name, "the base model")
        flat = [m.reshape(-1).float() for m in models]
        for i, m in enumerate(flat):
            check_finite(m, name, f"model {i}")
        chunks = split_chunks(flat_base, flat, self.align(job), chunk_elems)
        stats = self.reduce(job, chunks)
        out = [self.apply(job, c, stats) for c in chunks]
        return (torch.cat(out) if out else torch.zeros(0)).reshape(shape)


def gather_values(numel: int, chunks, values) -> torch.Tensor:
    """``values(chunk)`` (float32, one per element) of every chunk, in one float32 tensor of
    ``numel`` filled in place: 4 bytes per element, never a list of pieces and its copy."""
    out = torch.empty(numel, dtype=torch.float32)
    pos = 0
    for c in chunks:
        v = values(c).reshape(-1)
        out[pos:pos + v.numel()] = v
        pos += v.numel()
    return out[:pos]


def order_statistics(values: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """The ``ks``-th smallest (0-based) of a flat float32 CPU tensor, as torch.kthvalue gives
    them (NaN largest), by partitioning ``values`` in place: kthvalue would copy the tensor and
    add int64 indices, 3x its memory again."""
    a = values.numpy()
    a.partition(sorted(set(ks)))
    return torch.from_numpy(a[list(ks)].copy())


def split_chunks(base, models, align: int, chunk_elems: int | None) -> list[Chunk]:
    """Contiguous chunks of about ``chunk_elems`` elements, boundaries on multiples of align."""
    n = (models[0] if models else base).numel()
    step = n if not chunk_elems else max(align, (chunk_elems // max(align, 1)) * align)
    starts = range(0, n, max(step, 1)) if n else [0]
    return [Chunk(s, None if base is None else base[s:s + step], [m[s:s + step] for m in models])
            for s in starts]


def gram_matrix(models: Sequence[torch.Tensor], base: torch.Tensor | None, tasks: bool,
                sub: int = 1 << 20):
    """float64 Gram matrix (numpy) of the flat float32 ``models`` then ``base`` (``tasks``: of
    ``models - base``), summed in sub-blocks of ``sub`` elements on the inputs' device."""
    vecs = [m.reshape(-1) for m in models] + ([] if base is None else [base.reshape(-1)])
    size = len(vecs) - (1 if tasks else 0)
    g = torch.zeros(size, size, dtype=torch.float64, device=vecs[0].device)
    for s in range(0, vecs[0].numel(), sub):
        xs = [v[s:s + sub].float() for v in vecs]
        if tasks:
            b = xs.pop()
            xs = [x - b for x in xs]
        a = torch.stack(xs).double()
        g += a @ a.T
    return g.cpu().numpy()
