"""The primitive ops of the fast backends, defined once with torch.library.

Schemas and fake (meta) kernels live here; backend torch's plain-torch kernels
(backends/pytorch/kernels.py) are the registered fallback (CompositeExplicitAutograd) and the
definition the C++/CUDA/Triton kernels mirror:

- ``fastmerge::score_histogram``: radix-select digit histograms of the selection score
  (|t_i| or t_i*t_i*v_i, as float32 bits) for (model, prefix) targets, plus per-bin sums of
  |t_i|, accumulated in place so chunks and tensors merge by addition.
- ``fastmerge::model_stats``: per-model sums over a chunk: sum |t_i|, sum |t_i| over the kept
  elements (mode 0/1/2/3 of ``iparams``), sum v_i^p; accumulated in place (float64).
- ``fastmerge::fused_merge``: the one-pass merge of a chunk: reads base + N models (+ N second
  moments) once and writes the output dtype once.
- ``fastmerge::topk_window`` (optional; the CPU kernels have a fast one): the exact k-th
  largest |t_i| of one whole tensor in one read pass, where the histogram route needs two;
  a kernel may report a miss (-1) and the planner then runs the histograms.

Per-model parameters travel packed (see ``fastmerge.planning.plan``):
``fparams`` float32 [N, 6] = (weight, rescale, lo, hi, consensus_lambda, ota_scale);
``iparams`` int64 [N, 3] = (mode, dare_key as int64 bits, dare_keep_threshold).
Keep j iff mode 0; or mode 1 and lo <= score < hi (hi = inf: no upper bound); never for
mode 2; mode 3 iff word (j & 3) of Philox(key, counter j >> 2) < dare_keep_threshold, j = offset +
the local index (semantics v2, ``rng.philox_uniform_u32``).
"""
from __future__ import annotations

import torch

LIB = torch.library.Library("fastmerge", "DEF")
LIB.define("score_histogram(Tensor? base, Tensor[] models, Tensor[] second_moments, int score, "
           "Tensor targets, int level, Tensor(a!) counts, Tensor(b!) sums) -> ()")
LIB.define("model_stats(Tensor? base, Tensor[] models, Tensor[] second_moments, int score, "
           "Tensor fparams, Tensor iparams, float power, int offset, Tensor(a!) out) -> ()")
LIB.define("fused_merge(Tensor? base, Tensor[] models, Tensor[] second_moments, Tensor fparams, "
           "Tensor iparams, int combine, int score, int elect, int elect_on, int normalize, "
           "int consensus_k, float scale, float power, float eps, int offset, "
           "ScalarType out_dtype, Tensor(a!) nonfinite) -> Tensor")
LIB.define("topk_window(Tensor? base, Tensor[] models, Tensor requests, bool l1) "
           "-> (Tensor, Tensor, Tensor, Tensor)")


from .pytorch.kernels import (  # noqa: E402,F401
    fused_merge_torch,
    model_stats_torch,
    score_histogram_torch,
    topk_window_torch,
)

torch.library.impl(LIB, "score_histogram", "CompositeExplicitAutograd")(score_histogram_torch)
torch.library.impl(LIB, "model_stats", "CompositeExplicitAutograd")(model_stats_torch)
torch.library.impl(LIB, "fused_merge", "CompositeExplicitAutograd")(fused_merge_torch)
torch.library.impl(LIB, "topk_window", "CompositeExplicitAutograd")(topk_window_torch)


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("fastmerge::score_histogram")
def _score_histogram_fake(base, models, second_moments, score, targets, level, counts, sums):
    return None


@torch.library.register_fake("fastmerge::model_stats")
def _model_stats_fake(base, models, second_moments, score, fparams, iparams, power, offset, out):
    return None


@torch.library.register_fake("fastmerge::fused_merge")
def _fused_merge_fake(base, models, second_moments, fparams, iparams, combine, score, elect,
                      elect_on, normalize, consensus_k, scale, power, eps, offset, out_dtype,
                      nonfinite):
    return models[0].new_empty(models[0].shape, dtype=out_dtype)


@torch.library.register_fake("fastmerge::topk_window")
def _topk_window_fake(base, models, requests, l1):
    r, n = requests.shape[0], len(models)
    return (requests.new_empty((r,), dtype=torch.int64),
            requests.new_empty((r,), dtype=torch.float64),
            requests.new_empty((n,), dtype=torch.float64),
            requests.new_empty((n,), dtype=torch.int64))
