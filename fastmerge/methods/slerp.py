"""slerp, nuslerp and multislerp: spherical interpolation, as mergekit 0.1.5 defines it.

Every norm and dot product is a float64 sum over chunks (the pre-pass); the output is then one
linear combination of the inputs per element (or per row / column) with float32 coefficients.

Defined where mergekit is fragile (docs/semantics.md):
- slerp: a norm <= 1e-8 counts as 1 (as mergekit), so a zero input is "orthogonal" to the
  other: out = sin(t*pi/2) * v1 for v0 = 0; both zero gives 0. |cos| > 0.9995 (parallel or
  antiparallel) interpolates linearly, (1-t) v0 + t v1.
- nuslerp: a pair is colinear (linear interpolation) when its cosine rounds to +-1 in float32,
  i.e. |cos| >= 1 - 2^-25, computed in float64; mergekit tests its float32-rounded cosine, so
  for exactly antiparallel inputs it may take the spherical branch (limit cos(pi t) v0 instead
  of (1-2t) v0). A zero vector has cos = 0 (theta = pi/2), as in mergekit.
- multislerp: the tangent-space step is identically zero in exact arithmetic (the weighted
  mean of the units is parallel to its own direction), so out = (sum_i a_i x_i) * sum_i w_i n_i
  / |m| with a_i = w_i / (n_i + eps); mergekit's value differs by float32 rounding only. When
  |m| < eps (or below the float64 rounding of its Gram form, 2^-20 sum_i |a_i| |x_i|: an
  antipodal pair leaves only noise there), every input count (not only 2, where mergekit
  does the same) falls back to the linear sum_i w_i x_i (+ base); mergekit raises for 3 or
  more. Weights summing to 0 with
  normalize_weights are an error.
"""
from __future__ import annotations

import math

from .core import Chunk, Combination, Job, Method, rows_view
from .lazy_torch import torch
from .schema import MethodSchema, Param

SLERP_DOT_THRESHOLD = 0.9995   # mergekit's slerp: |cos| above this interpolates linearly
SLERP_NORM_EPS = 1e-8          # mergekit's slerp: a norm at most this counts as 1
NUSLERP_NORM_EPS = 1e-7        # mergekit's nuslerp: norms clamp to at least this
NUSLERP_COLINEAR = 1.0 - 2.0 ** -25  # |cos| at which float32 rounds the cosine to +-1


def _weight_param(doc: str) -> Param:
    return Param("weight", float, scope="per_model", doc=doc)


def spherical_coefficients(cos: torch.Tensor, t: float, colinear: torch.Tensor):
    """(c0, c1) with c0 v0 + c1 v1 the slerp at t, linear where ``colinear`` (float64)."""
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    return c0, c1


def pair_sums(v0: torch.Tensor, v1: torch.Tensor, dim=None) -> torch.Tensor:
    """[|v0|^2, |v1|^2, v0.v1] in float64, summed over ``dim`` (all elements when None)."""
    a, b = v0.double(), v1.double()
    if dim is None:
        return torch.stack([(a * a).sum(), (b * b).sum(), (a * b).sum()])
    return torch.stack([(a * a).sum(dim), (b * b).sum(dim), (a * b).sum(dim)])


def pair_coefficients(s00: float, s11: float, s01: float, t: float, norm_floor: float,
                      colinear: float, strict: bool) -> tuple[float, float]:
    """(c0, c1) of the slerp at t from float64 |v0|^2, |v1|^2 and v0.v1, without torch: the
    scalar form of ``spherical_coefficients``. ``norm_floor``: slerp's (a norm at most it
    counts as 1) when ``strict``, nuslerp's clamp otherwise; linear where |cos| passes
    ``colinear`` (> for slerp, >= for nuslerp)."""
    n0, n1 = math.sqrt(max(s00, 0.0)), math.sqrt(max(s11, 0.0))
    if strict:
        n0, n1 = (n0 if n0 > norm_floor else 1.0), (n1 if n1 > norm_floor else 1.0)
    else:
        n0, n1 = max(n0, norm_floor), max(n1, norm_floor)
    cos = min(1.0, max(-1.0, s01 / (n0 * n1)))
    if (abs(cos) > colinear) if strict else (abs(cos) >= colinear):
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


# --- slerp -----------------------------------------------------------------------------------

class Slerp(Method):
    """out = [sin((1-t) theta) v0 + sin(t theta) v1] / sin(theta), v0 = base, over the whole
    tensor; theta from the cosine of the flattened tensors."""
    schema = MethodSchema(
        "slerp", (Param("t", float, lo=0.0, hi=1.0,
                        doc="0 gives the base, 1 the other model"),),
        base="required", min_models=1, max_models=1,
        paper="https://en.wikipedia.org/wiki/Slerp")
    reductions = "|base|^2, |model|^2, base.model over the whole tensor (3 float64 sums)"

    def reduce(self, job: Job, chunks) -> tuple[float, float]:
        s = torch.zeros(3, dtype=torch.float64)
        for c in chunks:
            s += pair_sums(c.base, c.models[0])
        n0, n1 = s[0].sqrt(), s[1].sqrt()
        n0 = torch.where(n0 > SLERP_NORM_EPS, n0, torch.ones_like(n0))
        n1 = torch.where(n1 > SLERP_NORM_EPS, n1, torch.ones_like(n1))
        cos = (s[2] / (n0 * n1)).clamp(-1, 1)
        c0, c1 = spherical_coefficients(cos, job.params["t"], cos.abs() > SLERP_DOT_THRESHOLD)
        return float(c0), float(c1)

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        c0, c1 = stats
        return c0 * chunk.base + c1 * chunk.models[0]

    def combination(self, job: Job) -> Combination:
        def coefficients(g):   # V = [model, base]
            c0, c1 = pair_coefficients(g[1][1], g[0][0], g[1][0], job.params["t"],
                                       SLERP_NORM_EPS, SLERP_DOT_THRESHOLD, strict=True)
            return [c1, c0]
        return Combination("inputs", coefficients)


# --- nuslerp ---------------------------------------------------------------------------------

def _nuslerp_t(weights) -> float:
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _nuslerp_coefficients(sums: torch.Tensor, t: float):
    """Per-vector (c0, c1) from float64 [|v0|^2, |v1|^2, v0.v1] sums (any trailing shape)."""
    n0 = sums[0].sqrt().clamp(min=NUSLERP_NORM_EPS)
    n1 = sums[1].sqrt().clamp(min=NUSLERP_NORM_EPS)
    cos = (sums[2] / (n0 * n1)).clamp(-1, 1)
    return spherical_coefficients(cos, t, cos.abs() >= NUSLERP_COLINEAR)


class NuSlerp(Method):
    """Slerp of the two non-base models (of their task vectors with a base) at
    t = w2 / (w1 + w2), over the whole tensor (nuslerp_flatten, the default), each row
    (vectors along the last dim) or, with nuslerp_row_wise, each column (vectors along dim 0)."""
    schema = MethodSchema(
        "nuslerp", (_weight_param("relative weight; t = w2 / (w1 + w2)"),
                    Param("nuslerp_row_wise", bool, False,
                          doc="with flatten off: slerp vectors along dim 0, not the last dim"),
                    Param("nuslerp_flatten", bool, True, doc="slerp the whole tensor as one")),
        base="optional", min_models=2, max_models=2)
    reductions = ("flatten: 3 float64 sums over the tensor; row_wise: 3 float64 sums per "
                  "column over all rows; per-row mode: none across chunks (row-local)")

    def mode(self, job: Job) -> str:
        if job.params["nuslerp_flatten"] or len(job.shape) <= 1:
            return "flat"   # a 1-D tensor is one vector either way
        return "columns" if job.params["nuslerp_row_wise"] else "rows"

    def align(self, job: Job) -> int:
        mode = self.mode(job)
        if mode == "rows":
            return max(rows_view(job.shape)[1], 1)
        return max(math.prod(job.shape[1:]), 1) if mode == "columns" else 1

    def _pair(self, chunk: Chunk):
        v0, v1 = chunk.models
        if chunk.base is not None:
            v0, v1 = v0 - chunk.base, v1 - chunk.base
        return v0, v1

    def reduce(self, job: Job, chunks):
        mode = self.mode(job)
        if mode == "rows":
            return None
        t = _nuslerp_t(job.params["weight"])
        cols = self.align(job) if mode == "columns" else None
        total = None
        for c in chunks:
            v0, v1 = self._pair(c)
            s = pair_sums(v0, v1) if cols is None else \
                pair_sums(v0.reshape(-1, cols), v1.reshape(-1, cols), dim=0)
            total = s if total is None else total + s
        if total is None:
            return None
        c0, c1 = _nuslerp_coefficients(total, t)
        return c0.float(), c1.float()

    def state_bytes(self, job: Job) -> tuple[int, int]:
        # row_wise: 3 float64 sums per column, then the coefficients' float64 temporaries
        if self.mode(job) != "columns":
            return 0, 0
        cols = self.align(job)
        return 24 * cols, 96 * cols

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        v0, v1 = self._pair(chunk)
        if v0.numel() == 0:
            return v0
        mode = self.mode(job)
        if mode == "rows":
            cols = self.align(job)
            r0, r1 = v0.reshape(-1, cols), v1.reshape(-1, cols)
            c0, c1 = _nuslerp_coefficients(pair_sums(r0, r1, dim=1),
                                           _nuslerp_t(job.params["weight"]))
            out = (c0.float()[:, None] * r0 + c1.float()[:, None] * r1).reshape(-1)
        elif mode == "columns":
            cols = self.align(job)
            c0, c1 = stats
            out = (c0 * v0.reshape(-1, cols) + c1 * v1.reshape(-1, cols)).reshape(-1)
        else:
            c0, c1 = stats
            out = c0 * v0 + c1 * v1
        return out if chunk.base is None else chunk.base + out

    def combination(self, job: Job) -> Combination | None:
        if self.mode(job) != "flat":
            return None   # a slerp per row or column: not one combination per tensor
        t = _nuslerp_t(job.params["weight"])

        def coefficients(g):   # g over the two (task) vectors
            c0, c1 = pair_coefficients(g[0][0], g[1][1], g[0][1], t, NUSLERP_NORM_EPS,
                                       NUSLERP_COLINEAR, strict=False)
            return [c0, c1, 1.0 - c0 - c1] if job.has_base else [c0, c1]
        return Combination("tasks" if job.has_base else "inputs", coefficients)


# --- multislerp ------------------------------------------------------------------------------

def multislerp_floor(unit_scale: float, eps: float) -> float:
    """|m| below which multislerp falls back to linear: eps (mergekit), or the float64 rounding
    of |m| = sqrt(a G a) from the Gram matrix (2^-20 sum |a_i| |x_i|), where cancelling
    inputs (an antipodal pair) leave only noise for a direction."""
    return max(eps, 2.0 ** -20 * unit_scale)


def _check_multislerp(params: dict, n: int) -> None:
    if params["normalize_weights"] and n > 1 and sum(params["weight"]) == 0:
        raise ValueError("multislerp: weight sums to 0, so normalize_weights cannot divide by it")


class MultiSlerp(Method):
    """Barycentric interpolation on the hypersphere of N task vectors (models without a base):
    direction of sum_i w_i x_i / (|x_i| + eps), length sum_i w_i |x_i|, over the whole tensor."""
    schema = MethodSchema(
        "multislerp", (_weight_param("barycentric weight"),
                       Param("normalize_weights", bool, True, doc="divide weights by their sum"),
                       Param("eps", float, 1e-8, lo=0.0, open_lo=True,
                             doc="added to norms; |mean| below it falls back to linear")),
        base="optional", min_models=1, check=_check_multislerp,
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
    reductions = "Gram matrix x_i.x_j of the N (task) vectors over the whole tensor (float64)"

    def _vectors(self, chunk: Chunk) -> list[torch.Tensor]:
        if chunk.base is None:
            return chunk.models
        return [m - chunk.base for m in chunk.models]

    def _weights(self, job: Job) -> list[float]:
        w = list(job.params["weight"])
        if job.params["normalize_weights"]:
            total = sum(w)
            w = [x / total for x in w]
        return w

    def reduce(self, job: Job, chunks):
        n = len(job.params["weight"])
        if n == 1:
            return None
        gram = torch.zeros(n, n, dtype=torch.float64)
        for c in chunks:
            x = torch.stack(self._vectors(c)).double()
            gram += x @ x.T
        w = torch.tensor(self._weights(job), dtype=torch.float64)
        norms = gram.diagonal().clamp(min=0).sqrt()
        a = w / (norms + job.params["eps"])
        mean_norm = (a @ gram @ a).clamp(min=0).sqrt()
        if mean_norm < multislerp_floor(float((a.abs() * norms).sum()), job.params["eps"]):
            return w.float()  # the linear fallback: sum_i w_i x_i
        return (a * (w * norms).sum() / mean_norm).float()

    def combination(self, job: Job) -> Combination:
        n, base = len(job.params["weight"]), [1.0] if job.has_base else []
        if n == 1:   # one model: returned as it is
            return Combination(None, lambda g: [1.0] + [0.0] * len(base))
        w = self._weights(job)
        eps = job.params["eps"]

        def coefficients(g):   # g over the N (task) vectors
            import numpy as np
            g = np.asarray(g, dtype=np.float64)
            norms = np.sqrt(np.clip(np.diag(g), 0, None))
            wv = np.asarray(w, dtype=np.float64)
            a = wv / (norms + eps)
            mean_norm = math.sqrt(max(float(a @ g @ a), 0.0))
            floor = multislerp_floor(float((abs(a) * norms).sum()), eps)
            c = wv if mean_norm < floor else a * float((wv * norms).sum()) / mean_norm
            c = [float(x) for x in c]
            return c + [1.0 - sum(c)] * len(base)
        return Combination("tasks" if job.has_base else "inputs", coefficients)

    def apply(self, job: Job, chunk: Chunk, stats) -> torch.Tensor:
        if stats is None:
            return chunk.models[0]  # one model: returned as it is
        out = sum(float(c) * x for c, x in zip(stats, self._vectors(chunk), strict=True))
        return out if chunk.base is None else chunk.base + out


SLERP = Slerp()
NUSLERP = NuSlerp()
MULTISLERP = MultiSlerp()
