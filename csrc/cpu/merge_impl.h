// fastmerge CPU backend: the fused merge pass over a thread's element range (templates).
//
// Per block of kBlock elements: inputs -> float32 task vectors (counting non-finite values),
// then per model the sparsified values s_i = (t_i * keep_i) * rescale_i with the keep mode
// hoisted out of the element loop (fm_keep_mode<MODE>), then the shared per-element combine
// fm_combine() (csrc/common/fastmerge_element.h, the same code the CUDA backend runs) with the
// combine id and N fixed at compile time so the element loop unrolls over the models and
// vectorises across elements, and finally one rounding loop to the output dtype.
// Each (combine, N) instance is its own multiversioned function (FM_CPU_CLONES); the
// instances are spread over merge_*.cpp so they compile in parallel.
#pragma once

#include <stdlib.h>

#include "fm_cpu_block.h"

namespace fastmerge {
namespace cpu {
namespace detail {

struct MergeCtx {
  const Inputs* in;
  FmMergeConfig cfg;
  const FmModel* models;
  int64_t offset;
  void* out;
  int out_dtype;
  bool need_v;
};

// s = sparsify(t, keep) for one model over one block, the keep mode fixed at compile time
template <int MODE>
FM_FORCE_INLINE void sparsify_block(const FmModel& m, const float* __restrict t,
                                    const float* __restrict v, int score, uint64_t j0, int len,
                                    float* __restrict s) {
  const float r = m.rescale;
  if (MODE == MODE_DARE) {  // the block's Philox draws on the SIMD unit (philox_block.cpp)
    alignas(64) uint32_t w[kBlock];
    philox_word0_block(m.key_lo, m.key_hi, j0, len, w);
    for (int k = 0; k < len; ++k)
      s[k] = fm_sparsify(t[k], static_cast<uint64_t>(w[k]) < m.dare_threshold, r);
    return;
  }
  if (v != nullptr) {
    for (int k = 0; k < len; ++k)
      s[k] = fm_sparsify(t[k], fm_keep_mode<MODE>(m, t[k], v[k], score, j0 + k), r);
  } else {
    for (int k = 0; k < len; ++k)
      s[k] = fm_sparsify(t[k], fm_keep_mode<MODE>(m, t[k], 0.0f, score, j0 + k), r);
  }
}

FM_FORCE_INLINE void sparsify_model(const FmModel& m, const float* t, const float* v, int score,
                                    uint64_t j0, int len, float* s) {
  switch (m.mode) {
    case MODE_KEEP_ALL:
      sparsify_block<MODE_KEEP_ALL>(m, t, v, score, j0, len, s);
      break;
    case MODE_BAND:
      sparsify_block<MODE_BAND>(m, t, v, score, j0, len, s);
      break;
    case MODE_DARE:
      sparsify_block<MODE_DARE>(m, t, v, score, j0, len, s);
      break;
    default:
      sparsify_block<MODE_KEEP_NONE>(m, t, v, score, j0, len, s);
      break;
  }
}

// The merge of [begin, end) for a combine id and model count known at compile time
// (NS = 0: any n up to FM_MAX_MODELS).
template <int COMBINE, int NS>
__attribute__((noinline)) FM_CPU_CLONES static void merge_range_impl(
    const MergeCtx& ctx, int64_t begin, int64_t end, int64_t* nonfinite, bool* done) {
  constexpr int CAP = NS > 0 ? NS : FM_MAX_MODELS;
  constexpr bool kLinear = COMBINE == COMBINE_LINEAR;
  const Inputs& in = *ctx.in;
  FmMergeConfig cfg = ctx.cfg;
  cfg.combine = COMBINE;
  cfg.v_is_power = 1;  // the OTA block loop below applies fm_ota_power
  if (NS > 0) cfg.n = NS;
  const int n = cfg.n;
  FmModel models[CAP];
  for (int i = 0; i < n; ++i) models[i] = ctx.models[i];
  const bool has_base = in.base != nullptr && !kLinear;
  const bool need_v = ctx.need_v;

  // per-model block buffers on the heap (up to 3 * 32 * 2 KiB), the rest on the stack
  float* work = static_cast<float*>(aligned_alloc(64, sizeof(float) * 3 * CAP * kBlock));
  if (work == nullptr) return;  // the caller counts unprocessed ranges as a failure
  float(*tt)[kBlock] = reinterpret_cast<float(*)[kBlock]>(work);
  float(*ss)[kBlock] = reinterpret_cast<float(*)[kBlock]>(work + CAP * kBlock);
  float(*vv)[kBlock] = reinterpret_cast<float(*)[kBlock]>(work + 2 * CAP * kBlock);
  alignas(64) float bb[kBlock];
  alignas(64) float ob[kBlock];
  if (!has_base) {
    for (int k = 0; k < kBlock; ++k) bb[k] = 0.0f;
  }

  for (int64_t s0 = begin; s0 < end; s0 += kBlock) {
    const int len = static_cast<int>(end - s0 < kBlock ? end - s0 : kBlock);
    if (has_base) load_block(in.base, in.base_dtype, s0, len, bb);
    for (int i = 0; i < n; ++i) {
      load_task_block(in.models[i], in.model_dtypes[i], s0, len, bb, has_base, tt[i]);
      nonfinite[i] += count_nonfinite(tt[i], len);
      if (need_v) load_block(in.moments[i], in.moment_dtypes[i], s0, len, vv[i]);
    }
    if (!kLinear) {
      const uint64_t j0 = static_cast<uint64_t>(ctx.offset + s0);
      for (int i = 0; i < n; ++i)
        sparsify_model(models[i], tt[i], need_v ? vv[i] : nullptr, cfg.score, j0, len,
                       ss[kLinear ? 0 : i]);
    }
    if (COMBINE == COMBINE_OTA) {  // P = max(v, 0)^p once per element, in a vector loop
      for (int i = 0; i < n; ++i) {
        float* __restrict v = vv[i];
        if (cfg.power == 0.5f) {
          for (int k = 0; k < len; ++k) v[k] = fm_ota_power(v[k], 0.5f);
        } else {
          for (int k = 0; k < len; ++k) v[k] = fm_ota_power(v[k], cfg.power);
        }
      }
    }
    for (int k = 0; k < len; ++k) {
      float t[CAP], s[CAP], v[CAP];
      for (int i = 0; i < n; ++i) {
        t[i] = tt[i][k];
        s[i] = kLinear ? 0.0f : ss[kLinear ? 0 : i][k];
        v[i] = COMBINE == COMBINE_OTA ? vv[i][k] : 0.0f;
      }
      ob[k] = fm_combine(cfg, models, t, s, v, bb[k]);
    }
    store_block(ctx.out, ctx.out_dtype, s0, len, ob);
  }
  free(work);
  *done = true;
}

template <int COMBINE>
FM_FORCE_INLINE void merge_range_n(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf,
                                   bool* done) {
  switch (ctx.cfg.n) {
    case 1: merge_range_impl<COMBINE, 1>(ctx, b, e, nf, done); break;
    case 2: merge_range_impl<COMBINE, 2>(ctx, b, e, nf, done); break;
    case 3: merge_range_impl<COMBINE, 3>(ctx, b, e, nf, done); break;
    case 4: merge_range_impl<COMBINE, 4>(ctx, b, e, nf, done); break;
    case 8: merge_range_impl<COMBINE, 8>(ctx, b, e, nf, done); break;
    default: merge_range_impl<COMBINE, 0>(ctx, b, e, nf, done); break;
  }
}

// one per translation unit (merge_group_*.cpp): the combines that unit instantiates
void merge_range_linear_sum(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf, bool* done);
void merge_range_ties_ota(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf, bool* done);
void merge_range_consensus(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf, bool* done);

}  // namespace detail
}  // namespace cpu
}  // namespace fastmerge
