// fastmerge CPU backend: the fused merge pass over a thread's element range (templates).
//
// Per block of kBlock elements: per model one vectorised loop (task_sparsify_block) reads the
// model block (bf16 directly, other dtypes via a float32 block), forms t_i = m_i - b, counts
// non-finite values and writes s_i = (t_i * keep_i) * rescale_i with the keep mode (and for a
// band whether hi = +Inf) hoisted out of the loop; then the shared per-element combine
// fm_combine() (csrc/common/fastmerge_element.h, the same code the CUDA backend runs) with the
// combine id and N fixed at compile time (and the default TIES election, sum over weighted
// values) so the element loop unrolls over the models and vectorises across elements, and
// finally one rounding loop to the output dtype. Two short loops rather than one long one: a
// single fused element loop is a ~70-cycle dependency chain per vector (compares, mask logic,
// the division) that the out-of-order window cannot overlap (measured slower here). Keep
// decisions that read v (the fisher score) keep the older per-pass code.
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

}  // namespace detail
}  // namespace cpu
}  // namespace fastmerge

#include "merge_avx512.h"

namespace fastmerge {
namespace cpu {
namespace detail {

// s = sparsify(t, keep) for one model over one block, the keep mode fixed at compile time
template <int MODE>
FM_FORCE_INLINE void sparsify_block(const FmModel& m, const float* __restrict t,
                                    const float* __restrict v, int score, uint64_t j0, int len,
                                    float* __restrict s) {
  const float r = m.rescale;
  if (MODE == MODE_DARE) {  // the block's Philox draws on the SIMD unit (philox_block.cpp)
    alignas(64) uint32_t w[kBlock];
    philox_dare_block(m.key_lo, m.key_hi, j0, len, w);
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
    case MODE_KEEP_ALL: sparsify_block<MODE_KEEP_ALL>(m, t, v, score, j0, len, s); break;
    case MODE_BAND: sparsify_block<MODE_BAND>(m, t, v, score, j0, len, s); break;
    case MODE_DARE: sparsify_block<MODE_DARE>(m, t, v, score, j0, len, s); break;
    default: sparsify_block<MODE_KEEP_NONE>(m, t, v, score, j0, len, s); break;
  }
}

// One model over one block in one vectorised loop: t = m - b (m itself without a base), the
// count of non-finite t, and s = sparsify(t, keep) for a keep mode fixed at compile time that
// reads no v (the magnitude score; DARE from the words w of philox_dare_block). The same fm_*
// operations per element as load_task_block + count_nonfinite + sparsify_block; m comes as
// bf16 bits (SRC_BF16) or float32. t is stored only where the combine reads it (STORE_T).
template <int MODE, bool HI_INF, bool HAS_BASE, bool SRC_BF16, bool STORE_T>
FM_FORCE_INLINE int32_t task_sparsify_loop(const FmModel& m, const void* src,
                                           const float* __restrict bb, const uint32_t* __restrict w,
                                           int len, float* __restrict t_out, float* __restrict s) {
  const uint16_t* __restrict h = static_cast<const uint16_t*>(src);
  const float* __restrict f = static_cast<const float*>(src);
  const float r = m.rescale;
  const float lo = m.lo;
  const float hi = m.hi;
  uint32_t amax = 0;  // the largest |t| bit pattern: >= 0x7F800000 iff some t is not finite
  for (int k = 0; k < len; ++k) {
    const float mv = SRC_BF16 ? fm_bf16_to_float(h[k]) : f[k];
    const float t = HAS_BASE ? fm_sub(mv, bb[k]) : mv;
    const uint32_t a = fm_f2u(t) & 0x7FFFFFFFu;  // = fm_score_bits(t, 0, SCORE_MAGNITUDE)
    amax = a > amax ? a : amax;
    if (STORE_T) t_out[k] = t;
    bool keep;
    if (MODE == MODE_DARE) {
      keep = static_cast<uint64_t>(w[k]) < m.dare_threshold;
    } else if (MODE == MODE_BAND) {  // fm_band_keep(score, lo, hi), hi == +Inf decided outside
      const float score = fm_u2f(a);
      keep = HI_INF ? score >= lo : (score >= lo && score < hi);
    } else {
      keep = fm_keep_mode<MODE>(m, t, 0.0f, SCORE_MAGNITUDE, 0);
    }
    s[k] = fm_sparsify(t, keep, r);
  }
  if (amax < 0x7F800000u) return 0;
  int32_t c = 0;  // some t is Inf / NaN (rare): count them
  for (int k = 0; k < len; ++k) {
    const float mv = SRC_BF16 ? fm_bf16_to_float(h[k]) : f[k];
    c += fm_isfinite(HAS_BASE ? fm_sub(mv, bb[k]) : mv) ? 0 : 1;
  }
  return c;
}

template <int MODE, bool HAS_BASE, bool SRC_BF16>
FM_FORCE_INLINE int32_t task_sparsify_t(const FmModel& m, const void* src, const float* bb,
                                        const uint32_t* w, int len, float* t_out, float* s) {
  if (MODE == MODE_BAND && m.hi == fm_inf()) {
    return t_out != nullptr ? task_sparsify_loop<MODE, true, HAS_BASE, SRC_BF16, true>(
                                  m, src, bb, w, len, t_out, s)
                            : task_sparsify_loop<MODE, true, HAS_BASE, SRC_BF16, false>(
                                  m, src, bb, w, len, t_out, s);
  }
  return t_out != nullptr ? task_sparsify_loop<MODE, false, HAS_BASE, SRC_BF16, true>(m, src, bb, w,
                                                                                      len, t_out, s)
                          : task_sparsify_loop<MODE, false, HAS_BASE, SRC_BF16, false>(
                                m, src, bb, w, len, t_out, s);
}

template <int MODE>
FM_FORCE_INLINE int32_t task_sparsify_m(const FmModel& m, const void* src, bool src_bf16,
                                        const float* bb, const uint32_t* w, int len, float* t_out,
                                        float* s) {
  if (bb != nullptr) {
    return src_bf16 ? task_sparsify_t<MODE, true, true>(m, src, bb, w, len, t_out, s)
                    : task_sparsify_t<MODE, true, false>(m, src, bb, w, len, t_out, s);
  }
  return src_bf16 ? task_sparsify_t<MODE, false, true>(m, src, bb, w, len, t_out, s)
                  : task_sparsify_t<MODE, false, false>(m, src, bb, w, len, t_out, s);
}

// The per-model part of a block for a model whose keep decision reads no v (see
// task_sparsify_loop): m_block is the model's block (bf16 bits when src_bf16, else float32),
// bb the base block or null, j0 the global index of the block's first element (DARE counter).
// Returns the count of non-finite t. One function for every combine and N.
__attribute__((noinline, unused)) FM_CPU_CLONES static int32_t task_sparsify_block(
    const FmModel& m, const void* m_block, bool src_bf16, const float* bb, uint64_t j0, int len,
    float* t_out, float* s) {
  switch (m.mode) {
    case MODE_KEEP_ALL:
      return task_sparsify_m<MODE_KEEP_ALL>(m, m_block, src_bf16, bb, nullptr, len, t_out, s);
    case MODE_BAND:
      return task_sparsify_m<MODE_BAND>(m, m_block, src_bf16, bb, nullptr, len, t_out, s);
    case MODE_DARE: {
      alignas(64) uint32_t w[kBlock];
      philox_dare_block(m.key_lo, m.key_hi, j0, len, w);
      return task_sparsify_m<MODE_DARE>(m, m_block, src_bf16, bb, w, len, t_out, s);
    }
    default:
      return task_sparsify_m<MODE_KEEP_NONE>(m, m_block, src_bf16, bb, nullptr, len, t_out, s);
  }
}

// ob = fm_combine(...) over one block (the element loop that vectorises across elements)
template <int COMBINE, int NS>
FM_FORCE_INLINE void combine_loop(const FmMergeConfig& cfg, const FmModel* models,
                                  const float (*tt)[kBlock], const float (*ss)[kBlock],
                                  const float (*vv)[kBlock], const float* __restrict bb, int len,
                                  float* __restrict ob) {
  constexpr int CAP = NS > 0 ? NS : FM_MAX_MODELS;
  constexpr bool kLinear = COMBINE == COMBINE_LINEAR;
  const int n = cfg.n;
  for (int k = 0; k < len; ++k) {
    float t[CAP], s[CAP], v[CAP];
    for (int i = 0; i < n; ++i) {
      t[i] = tt[i][k];
      s[i] = kLinear ? 0.0f : ss[kLinear ? 0 : i][k];
      v[i] = COMBINE == COMBINE_OTA ? vv[i][k] : 0.0f;
    }
    ob[k] = fm_combine(cfg, models, t, s, v, bb[k]);
  }
}

// The merge of [begin, end) for a combine id and model count known at compile time
// (NS = 0: any n up to FM_MAX_MODELS).
template <int COMBINE, int NS>
__attribute__((noinline)) FM_CPU_CLONES static void merge_range_impl(const MergeCtx& ctx,
                                                                     int64_t begin, int64_t end,
                                                                     int64_t* nonfinite,
                                                                     StoredNonfinite* stored,
                                                                     bool* done) {
  constexpr int CAP = NS > 0 ? NS : FM_MAX_MODELS;
  constexpr bool kLinear = COMBINE == COMBINE_LINEAR;
  // the combines that read the task vectors t themselves (the others read s and v only)
  constexpr bool kTiesVote = COMBINE == COMBINE_TIES || COMBINE == COMBINE_CONSENSUS_TIES;
  constexpr bool kNeedT =
      kLinear || COMBINE == COMBINE_CONSENSUS_SUM || COMBINE == COMBINE_CONSENSUS_TIES;
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
  float (*tt)[kBlock] = reinterpret_cast<float (*)[kBlock]>(work);
  float (*ss)[kBlock] = reinterpret_cast<float (*)[kBlock]>(work + CAP * kBlock);
  float (*vv)[kBlock] = reinterpret_cast<float (*)[kBlock]>(work + 2 * CAP * kBlock);
  alignas(64) float bb[kBlock];
  alignas(64) float ob[kBlock];
  alignas(64) float mf[kBlock];  // a float16 / float32 model block as float32
  if (!has_base) {
    for (int k = 0; k < kBlock; ++k) bb[k] = 0.0f;
  }

  // Prefetch distance (0: none): 2 blocks; from 6 models up 8 blocks on AMD cores (measured
  // on an AMD EPYC VM, N = 8, 4096x4096 bf16, 2 threads: the merge 24 -> 22 ms; 8 blocks for
  // N = 3 made it slower, 5.4 -> 6.7 ms) and none on others (the Intel Xeon VM of CI, same
  // shape, fast path: 19.5 ms with 8 blocks, 18.4 with 2, 16.3 without; N = 3: 6.5 ms with
  // 2 blocks, 7.1 without).
  const int64_t ahead = n >= 6 ? (cpu_is_amd() ? 4 * kPrefetchAhead : 0) : kPrefetchAhead;
#ifdef FM_MERGE_AVX512
  // TIES / weighted sum over magnitude keeps of bf16 models: the AVX-512 block path
  // (merge_avx512.h), the generic code below only for tails and non-finite blocks
  constexpr bool kFastCombine = COMBINE == COMBINE_TIES || COMBINE == COMBINE_SUM;
  // (ctx.cfg, not the local cfg: a local whose address escapes to a call is no longer
  // invariant for the vectoriser, and the generic combine loop below fell back to scalar
  // code, dare_ties' merge 0.5 -> 5.3 ns per element and model)
  const bool fast = kFastCombine && fast_path_applies(ctx);
#endif
  for (int64_t s0 = begin; s0 < end; s0 += kBlock) {
    const int len = static_cast<int>(end - s0 < kBlock ? end - s0 : kBlock);
    if (ahead > 0 && s0 + ahead < end) {  // many input streams: help the hardware prefetcher
      const int64_t p0 = s0 + ahead;
      const int plen = static_cast<int>(end - p0 < kBlock ? end - p0 : kBlock);
      if (has_base) prefetch_block(in.base, in.base_dtype, p0, plen);
      for (int i = 0; i < n; ++i) prefetch_block(in.models[i], in.model_dtypes[i], p0, plen);
    }
#ifdef FM_MERGE_AVX512
    if constexpr (kFastCombine) {
      bool bad = false;
      if (fast && len % 32 == 0 && fast_block_any<COMBINE, NS>(ctx, models, s0, len, tt, &bad)) {
        if (bad) count_stored(ctx.out, ctx.out_dtype, s0, len, stored);
        continue;
      }
    }
#endif
    if (has_base) load_block(in.base, in.base_dtype, s0, len, bb);
    const uint64_t j0 = static_cast<uint64_t>(ctx.offset + s0);
    for (int i = 0; i < n; ++i) {
      if (need_v) load_block(in.moments[i], in.moment_dtypes[i], s0, len, vv[i]);
      // keep decisions that read no v: task vector, count and sparsify in one loop
      if (!kLinear && (cfg.score == SCORE_MAGNITUDE || models[i].mode != MODE_BAND)) {
        const bool bf16 = in.model_dtypes[i] == DTYPE_BFLOAT16;
        const void* mb;
        if (bf16) {
          mb = static_cast<const uint16_t*>(in.models[i]) + s0;
        } else {  // float16 / float32 models: float32 block first (not in tt[i]: t goes there)
          load_block(in.models[i], in.model_dtypes[i], s0, len, mf);
          mb = mf;
        }
        nonfinite[i] += task_sparsify_block(models[i], mb, bf16, has_base ? bb : nullptr, j0, len,
                                            kNeedT ? tt[i] : nullptr, ss[kLinear ? 0 : i]);
        continue;
      }
      load_task_block(in.models[i], in.model_dtypes[i], s0, len, bb, has_base, tt[i]);
      nonfinite[i] += count_nonfinite(tt[i], len);
      if (!kLinear)
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
    if (kTiesVote && cfg.elect == ELECT_SUM && cfg.elect_on == ELECT_WEIGHTED) {
      FmMergeConfig c = cfg;  // the default TIES election, fixed at compile time
      c.elect = ELECT_SUM;
      c.elect_on = ELECT_WEIGHTED;
      if (cfg.normalize == NORMALIZE_WEIGHTS) {  // and mergekit's normalize: no count kept
        c.normalize = NORMALIZE_WEIGHTS;
        combine_loop<COMBINE, NS>(c, models, tt, ss, vv, bb, len, ob);
      } else {
        combine_loop<COMBINE, NS>(c, models, tt, ss, vv, bb, len, ob);
      }
    } else {
      combine_loop<COMBINE, NS>(cfg, models, tt, ss, vv, bb, len, ob);
    }
    if (store_block(ctx.out, ctx.out_dtype, s0, len, ob))
      count_stored(ctx.out, ctx.out_dtype, s0, len, stored);
  }
  free(work);
  *done = true;
}

template <int COMBINE>
FM_FORCE_INLINE void merge_range_n(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf,
                                   StoredNonfinite* st, bool* done) {
  switch (ctx.cfg.n) {
    case 1: merge_range_impl<COMBINE, 1>(ctx, b, e, nf, st, done); break;
    case 2: merge_range_impl<COMBINE, 2>(ctx, b, e, nf, st, done); break;
    case 3: merge_range_impl<COMBINE, 3>(ctx, b, e, nf, st, done); break;
    case 4: merge_range_impl<COMBINE, 4>(ctx, b, e, nf, st, done); break;
    case 8: merge_range_impl<COMBINE, 8>(ctx, b, e, nf, st, done); break;
    default: merge_range_impl<COMBINE, 0>(ctx, b, e, nf, st, done); break;
  }
}

// a translation unit's two combines: merge_range_n<A> where the config's combine is A, else <B>
template <int A, int B>
FM_FORCE_INLINE void merge_range_either(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf,
                                        StoredNonfinite* st, bool* done) {
  if (ctx.cfg.combine == A) {
    merge_range_n<A>(ctx, b, e, nf, st, done);
  } else {
    merge_range_n<B>(ctx, b, e, nf, st, done);
  }
}

// one per translation unit (merge_group_*.cpp): the combines that unit instantiates
void merge_range_linear_sum(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf,
                            StoredNonfinite* st, bool* done);
void merge_range_ties_ota(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf,
                          StoredNonfinite* st, bool* done);
void merge_range_consensus(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf,
                           StoredNonfinite* st, bool* done);

}  // namespace detail
}  // namespace cpu
}  // namespace fastmerge
