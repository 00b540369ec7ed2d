"""Conformance checks of a backend against the float64 reference (docs/semantics.md tolerances).

Used by the test suite for every backend and by the benchmarks for their sanity checks."""
from __future__ import annotations

import torch

from . import reference
from .methods import resolve_spec

ELECTION_REL = 2.0 ** -20


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of ``dtype`` at |x| (float64), the spacing of that dtype there."""
    fi = torch.finfo(dtype)
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    ax = x.abs().clamp(min=fi.tiny)
    exp = torch.floor(torch.log2(ax))
    return torch.pow(2.0, exp - mant).clamp(min=fi.tiny * 2.0 ** -mant)


def ambiguous_elements(aux: dict) -> torch.Tensor:
    """Elements whose float32 decisions (sign election, consensus) may go either way."""
    shape = aux["base_abs"].shape
    amb = torch.zeros(shape, dtype=torch.bool)
    if "elect_sum" in aux:
        amb |= aux["elect_sum"].abs().cpu() <= ELECTION_REL * 4 * aux["elect_mag"].cpu()
    if "consensus_margin" in aux:
        amb |= aux["consensus_margin"].cpu() <= 2.0 ** -18
    return amb


def reference_with_aux(base, models, method, *, second_moments=None, tensor_name="",
                       out_dtype=None, thresholds=None, **params):
    spec = resolve_spec(method, len(models), **params)
    out64, aux = reference.merge(base, models, spec, tensor_name=tensor_name,
                                 second_moments=second_moments, dtype=torch.float64,
                                 out_dtype=torch.float64, thresholds=thresholds, return_aux=True)
    return spec, out64, aux


def assert_matches_reference(out: torch.Tensor, base, models, method, *, second_moments=None,
                             tensor_name="", out_dtype=None, **params) -> int:
    """Assert ``out`` equals the float64 reference within docs/semantics.md's tolerance, skipping
    only elements at an election/consensus decision boundary. Returns how many were skipped."""
    out_dtype = out_dtype or (base if base is not None else models[0]).dtype
    assert out.dtype == out_dtype, f"output dtype {out.dtype}, expected {out_dtype}"
    spec, ref, aux = reference_with_aux(base, models, method, second_moments=second_moments,
                                        tensor_name=tensor_name, **params)
    ref, got = ref.cpu(), out.cpu().to(torch.float64)
    b = base.cpu().to(torch.float64) if base is not None and spec.combine != "linear" else 0.0
    # docs/semantics.md: ulp_out(ref) + 2^-20 (|b| + |ref - b| + |lambda L| sum_i |w_i t_i|),
    # with the last term taken from the reference's own terms (rescale factors and divisors
    # included).
    tol = ulp(ref, out_dtype) + 2.0 ** -20 * (aux["base_abs"].cpu() + (ref - b).abs()
                                              + aux["term_mag"].cpu())
    skip = ambiguous_elements(aux)
    err = (got - ref).abs()
    bad = (err > tol) & ~skip
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{method}: {int(bad.sum())} of {ref.numel()} elements outside the tolerance of "
            f"docs/semantics.md; "
            f"first at {idx}: got {got[tuple(idx)].item()!r}, reference {ref[tuple(idx)].item()!r},"
            f" tolerance {tol[tuple(idx)].item():.3g}")
    return int(skip.sum())


def reference_masks(base, models, method, *, second_moments=None, tensor_name="", **params):
    """The reference keep-masks [N, *S] (bool) and per-model (lo, hi) thresholds."""
    spec = resolve_spec(method, len(models), **params)
    t32 = reference.task_vectors(base, models, torch.float32, tensor_name)
    return reference.keep_masks(spec, t32, second_moments, tensor_name)
