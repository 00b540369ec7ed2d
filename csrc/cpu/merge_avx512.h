// fastmerge CPU backend: the fused merge of one block on AVX-512 for the common case (TIES and
// the weighted sum over magnitude-band keeps, bf16 models, bf16 base or none).
//
// Why a hand-written path: the generic block code (merge_impl.h) runs every element through
// the shared per-element functions and lets the compiler vectorise them; on the Intel Xeon VM
// of this project's CI (2 cores) it ran at 0.27 ns per element and model in cache and 0.32
// streaming, 1 thread, N = 8: compute-bound, with most of the time in the combine's selects
// and in the bf16 widening shuffles. This path does the same float32 operations, in the same
// order, with fewer instructions:
//   - bf16 widened without shuffles: of a 32-bit lane holding elements 2j (low half) and 2j + 1
//     (high half), x << 16 is element 2j as float32 and x & 0xFFFF0000 element 2j + 1; a block
//     is processed in this even/odd order and the output is packed back the same way;
//   - keep + sparsify as one masked multiply (t * 0 where dropped, as fm_sparsify), the
//     multiplies by a rescale or weight of exactly 1 left out (x * 1 = x for finite x);
//   - the election's agreement test fm_mul(elected, e) > 0 as (e ^ sign(elected)) > 0
//     (multiplying by +-1 flips the sign bit only), and the disjoint sums as masked adds
//     (merged and wsum start at +0 and never become -0, so adding +0 where a model does not
//     agree changes nothing).
// Bit-identical to the generic code (tests/test_merge_fast_path.py compares both paths byte
// for byte); a block with a non-finite task-vector value is left to the generic code, which
// counts them. (A variant that stored the keep decisions as 16-bit masks and summed the vote
// with masked adds ran ~5 % slower here, N = 8: 17.8 against 17.0 ms; the mask stores and
// reloads cost more than the multiplies they save.)
#pragma once

#include "fm_cpu_block.h"

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 flags _mm512_undefined_*() inside its own intrinsics as maybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define FM_MERGE_AVX512 1
#endif

namespace fastmerge {
namespace cpu {
namespace detail {

#ifdef FM_MERGE_AVX512
#define FM_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), noinline))
#define FM_AVX512_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), always_inline)) inline

// keep kinds of the fast path (a model's FmModel::mode and hi decide which)
constexpr int FAST_BAND_INF = 0;  // |t| >= lo
constexpr int FAST_BAND = 1;      // lo <= |t| < hi
constexpr int FAST_ALL = 2;
constexpr int FAST_NONE = 3;
constexpr int FAST_DARE = 4;  // the block's DARE word < threshold (threshold in [1, 2^32 - 1])

// 32 bf16 values as float32 without a shuffle: of a 32-bit lane holding elements 2j (low half)
// and 2j + 1 (high half), x << 16 is element 2j and x & 0xFFFF0000 element 2j + 1.
FM_AVX512_INLINE void widen_even_odd(const uint16_t* p, __m512* even, __m512* odd) {
  const __m512i x = _mm512_loadu_si512(p);
  *even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  *odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Per model, u = w * sparsify(t) over one block in even/odd order (32 elements a group:
// positions 32g + j and 32g + 16 + j hold elements 32g + 2j and 32g + 2j + 1), stored to u
// when the combine reads it (STORE: TIES), and vote += u (vote = 0 + u for the first model,
// as fm_ties / fm_sum start from +0). Returns the largest |t| bit pattern (>= 0x7F800000: a
// non-finite value is present).
// dw: the DARE words of the block in element order (FAST_DARE only), taken in the same
// even/odd order as the values.
template <int KIND, bool HAS_BASE, bool MUL_R, bool MUL_W, bool FIRST, bool STORE>
FM_AVX512_INLINE uint32_t fast_model(const uint16_t* __restrict m, const float* __restrict bb,
                                     int len, const FmModel& p, const uint32_t* __restrict dw,
                                     float* __restrict u, float* __restrict vote) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 lo = _mm512_set1_ps(p.lo), hi = _mm512_set1_ps(p.hi);
  const __m512 r = _mm512_set1_ps(p.rescale), w = _mm512_set1_ps(p.weight);
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(p.dare_threshold & 0xFFFFFFFFu));
  const __m512i even_idx =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_idx =
      _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512i amax = _mm512_setzero_si512();
  for (int g = 0; g < len; g += 32) {
    __m512 t[2];
    widen_even_odd(m + g, &t[0], &t[1]);
    __mmask16 dare_keep[2] = {0, 0};
    if (KIND == FAST_DARE) {
      const __m512i w0 = _mm512_load_si512(dw + g), w1 = _mm512_load_si512(dw + g + 16);
      dare_keep[0] = _mm512_cmplt_epu32_mask(_mm512_permutex2var_epi32(w0, even_idx, w1), thr);
      dare_keep[1] = _mm512_cmplt_epu32_mask(_mm512_permutex2var_epi32(w0, odd_idx, w1), thr);
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const int q = g + 16 * h;
      if (HAS_BASE) t[h] = _mm512_sub_ps(t[h], _mm512_load_ps(bb + q));
      const __m512i a = _mm512_and_si512(_mm512_castps_si512(t[h]), abs_mask);
      amax = _mm512_max_epu32(amax, a);
      __m512 s;
      if (KIND == FAST_ALL) {
        s = t[h];
      } else if (KIND == FAST_NONE) {
        s = _mm512_mul_ps(t[h], zero);
      } else if (KIND == FAST_DARE) {
        s = _mm512_mask_mul_ps(t[h], static_cast<__mmask16>(~dare_keep[h]), t[h], zero);
      } else {
        __mmask16 keep = _mm512_cmp_ps_mask(_mm512_castsi512_ps(a), lo, _CMP_GE_OQ);
        if (KIND == FAST_BAND)
          keep = _mm512_mask_cmp_ps_mask(keep, _mm512_castsi512_ps(a), hi, _CMP_LT_OQ);
        s = _mm512_mask_mul_ps(t[h], static_cast<__mmask16>(~keep), t[h], zero);
      }
      if (MUL_R) s = _mm512_mul_ps(s, r);
      if (MUL_W) s = _mm512_mul_ps(w, s);
      if (STORE) _mm512_store_ps(u + q, s);
      const __m512 v = FIRST ? _mm512_add_ps(zero, s) : _mm512_add_ps(_mm512_load_ps(vote + q), s);
      _mm512_store_ps(vote + q, v);
    }
  }
  return _mm512_reduce_max_epu32(amax);
}

template <bool HAS_BASE, bool FIRST, bool STORE>
FM_AVX512_INLINE uint32_t fast_model_kind(const uint16_t* m, const float* bb, int len,
                                          const FmModel& p, const uint32_t* dw, float* u,
                                          float* vote) {
  const bool mul_r = p.rescale != 1.0f, mul_w = p.weight != 1.0f;
  int kind = FAST_NONE;
  if (p.mode == MODE_KEEP_ALL) kind = FAST_ALL;
  if (p.mode == MODE_BAND) kind = p.hi == fm_inf() ? FAST_BAND_INF : FAST_BAND;
  if (p.mode == MODE_DARE) {  // a threshold of 2^32 or more keeps all, 0 none (w < thr)
    kind = p.dare_threshold == 0              ? FAST_NONE
           : p.dare_threshold > 0xFFFFFFFFull ? FAST_ALL
                                              : FAST_DARE;
  }
#define FM_FAST_ARGS m, bb, len, p, dw, u, vote
#define FM_FAST_CASE(K)                                                                \
  case K:                                                                              \
    if (mul_r)                                                                         \
      return mul_w ? fast_model<K, HAS_BASE, true, true, FIRST, STORE>(FM_FAST_ARGS)   \
                   : fast_model<K, HAS_BASE, true, false, FIRST, STORE>(FM_FAST_ARGS); \
    return mul_w ? fast_model<K, HAS_BASE, false, true, FIRST, STORE>(FM_FAST_ARGS)    \
                 : fast_model<K, HAS_BASE, false, false, FIRST, STORE>(FM_FAST_ARGS);
  switch (kind) {
    FM_FAST_CASE(FAST_BAND_INF)
    FM_FAST_CASE(FAST_BAND)
    FM_FAST_CASE(FAST_ALL)
    FM_FAST_CASE(FAST_DARE)
    default: FM_FAST_CASE(FAST_NONE)
  }
#undef FM_FAST_CASE
#undef FM_FAST_ARGS
}

// The merged value q (before scale and base) per position, from the u of every model and
// their vote: TIES = fm_ties with the default election (sum over weighted values), SUM =
// fm_sum (its sum is the vote itself).
template <int COMBINE, int NS>
FM_AVX512_INLINE void fast_combine(const FmMergeConfig& cfg, const FmModel* models,
                                   const float (*uu)[kBlock], const float* __restrict vote, int len,
                                   float* __restrict q) {
  const int n = NS > 0 ? NS : cfg.n;
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  if (COMBINE == COMBINE_SUM) {
    const float d = fm_sum_divisor(cfg);
    const __m512 vd = _mm512_set1_ps(d);
    for (int k = 0; k < len; k += 16) {
      const __m512 v = _mm512_load_ps(vote + k);
      _mm512_store_ps(q + k, d == 1.0f ? v : _mm512_div_ps(v, vd));
    }
    return;
  }
  constexpr int CAP = NS > 0 ? NS : FM_MAX_MODELS;
  __m512 w[CAP];
  for (int i = 0; i < n; ++i) w[i] = _mm512_set1_ps(models[i].weight);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const int norm = cfg.normalize;
  for (int k = 0; k < len; k += 16) {
    // elected = +1 where the vote is >= 0 (NaN: -1), as fm_ties
    const __mmask16 pos = _mm512_cmp_ps_mask(_mm512_load_ps(vote + k), zero, _CMP_GE_OQ);
    const __m512 es = _mm512_castsi512_ps(_mm512_mask_mov_epi32(sign, pos, _mm512_setzero_si512()));
    __m512 merged = zero, wsum = zero, count = zero;
#pragma GCC unroll 8
    for (int i = 0; i < n; ++i) {
      const __m512 u = _mm512_load_ps(uu[i] + k);
      const __mmask16 agree = _mm512_cmp_ps_mask(_mm512_xor_ps(u, es), zero, _CMP_GT_OQ);
      merged = _mm512_mask_add_ps(merged, agree, merged, u);
      if (norm == NORMALIZE_WEIGHTS) wsum = _mm512_mask_add_ps(wsum, agree, wsum, w[i]);
      if (norm == NORMALIZE_COUNT) count = _mm512_mask_add_ps(count, agree, count, one);
    }
    __m512 r = merged;
    if (norm == NORMALIZE_WEIGHTS) {
      const __m512 d = _mm512_mask_mov_ps(wsum, _mm512_cmp_ps_mask(wsum, zero, _CMP_EQ_OQ), one);
      r = _mm512_div_ps(merged, d);
    } else if (norm == NORMALIZE_COUNT) {
      const __m512 d = _mm512_mask_mov_ps(one, _mm512_cmp_ps_mask(count, one, _CMP_GT_OQ), count);
      r = _mm512_div_ps(merged, d);
    }
    _mm512_store_ps(q + k, r);
  }
}

// b + scale * q at position k (b = 0 without a base: fm_combine adds the 0 too)
template <bool HAS_BASE>
FM_AVX512_INLINE __m512 fast_value(const float* q, const float* bb, __m512 vs, bool mul, int k) {
  __m512 y = _mm512_load_ps(q + k);
  if (mul) y = _mm512_mul_ps(vs, y);
  return _mm512_add_ps(HAS_BASE ? _mm512_load_ps(bb + k) : _mm512_setzero_ps(), y);
}

// fm_float_to_bf16 before its final >> 16: x + 0x7FFF + lsb, a NaN made quiet (defensive:
// the only NaN this path can produce from finite inputs, Inf / Inf, is the default quiet NaN,
// which both branches round alike)
FM_AVX512_INLINE __m512i fast_round_bf16(__m512 o) {
  const __m512i x = _mm512_castps_si512(o);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(o, o, _CMP_UNORD_Q), x,
                              _mm512_set1_epi32(0x00400000));
}

// out = b + scale * q, rounded to the output dtype and stored in element order: bf16 packed
// straight from the even/odd halves, other dtypes through a float32 block.
template <bool HAS_BASE>
FM_AVX512_INLINE void fast_store(const float* __restrict q, const float* __restrict bb, float scale,
                                 int len, void* out, int out_dtype, int64_t s0) {
  const __m512 vs = _mm512_set1_ps(scale);
  const bool mul = scale != 1.0f;
  if (out_dtype == DTYPE_BFLOAT16) {
    const __m512i odd_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    uint16_t* dst = static_cast<uint16_t*>(out) + s0;
    for (int g = 0; g < len; g += 32) {
      const __m512i e =
          _mm512_srli_epi32(fast_round_bf16(fast_value<HAS_BASE>(q, bb, vs, mul, g)), 16);
      const __m512i o = fast_round_bf16(fast_value<HAS_BASE>(q, bb, vs, mul, g + 16));
      // e | (o & 0xFFFF0000)
      _mm512_storeu_si512(dst + g, _mm512_ternarylogic_epi32(e, o, odd_mask, 0xF8));
    }
    return;
  }
  alignas(64) float ob[kBlock];
  const __m512i i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i i1 =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int g = 0; g < len; g += 32) {
    const __m512 e = fast_value<HAS_BASE>(q, bb, vs, mul, g);
    const __m512 o = fast_value<HAS_BASE>(q, bb, vs, mul, g + 16);
    _mm512_store_ps(ob + g, _mm512_permutex2var_ps(e, i0, o));
    _mm512_store_ps(ob + g + 16, _mm512_permutex2var_ps(e, i1, o));
  }
  store_block(out, out_dtype, s0, len, ob);
}

// One block [s0, s0 + len) of a fast-path merge (len a multiple of 32): false, with nothing
// written, when a task-vector value is not finite (the caller then runs the generic block).
// u: CAP rows of kBlock floats.
template <int COMBINE, int NS, bool HAS_BASE>
FM_AVX512_FN bool fast_block(const MergeCtx& ctx, const FmModel* models, int64_t s0, int len,
                             float (*uu)[kBlock]) {
  const FmMergeConfig& cfg = ctx.cfg;
  const Inputs& in = *ctx.in;
  const int n = NS > 0 ? NS : cfg.n;
  alignas(64) float bb[kBlock];
  alignas(64) float vote[kBlock];
  alignas(64) float q[kBlock];
  if (HAS_BASE) {  // the base block as float32, even/odd order
    const uint16_t* b = static_cast<const uint16_t*>(in.base) + s0;
    for (int g = 0; g < len; g += 32) {
      __m512 e, o;
      widen_even_odd(b + g, &e, &o);
      _mm512_store_ps(bb + g, e);
      _mm512_store_ps(bb + g + 16, o);
    }
  }
  constexpr bool kStore = COMBINE == COMBINE_TIES;  // the sum reads the vote only
  uint32_t amax = 0;
  alignas(64) uint32_t dw[kBlock];  // a DARE model's words (philox_block.cpp), drawn per block
  for (int i = 0; i < n; ++i) {
    const uint16_t* m = static_cast<const uint16_t*>(in.models[i]) + s0;
    if (models[i].mode == MODE_DARE)
      philox_dare_block(models[i].key_lo, models[i].key_hi, static_cast<uint64_t>(ctx.offset + s0),
                        len, dw);
    const uint32_t a =
        i == 0 ? fast_model_kind<HAS_BASE, true, kStore>(m, bb, len, models[i], dw, uu[i], vote)
               : fast_model_kind<HAS_BASE, false, kStore>(m, bb, len, models[i], dw, uu[i], vote);
    amax = a > amax ? a : amax;
  }
  if (amax >= 0x7F800000u) return false;
  fast_combine<COMBINE, NS>(cfg, models, uu, vote, len, q);
  fast_store<HAS_BASE>(q, bb, cfg.scale, len, ctx.out, ctx.out_dtype, s0);
  return true;
}

// Whether the fast path applies to a whole merge: TIES with the default election or the
// weighted sum, magnitude keeps (band, all, none) or DARE masks only, bf16 models, bf16 base
// or none.
inline bool fast_path_applies(const MergeCtx& ctx) {
  const FmMergeConfig& cfg = ctx.cfg;
  static const bool cpu_ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }();
  if (!cpu_ok || !merge_fast_path_enabled()) return false;
  if (cfg.combine == COMBINE_TIES) {
    if (cfg.elect != ELECT_SUM || cfg.elect_on != ELECT_WEIGHTED) return false;
  } else if (cfg.combine != COMBINE_SUM) {
    return false;
  }
  const Inputs& in = *ctx.in;
  if (ctx.need_v || cfg.score != SCORE_MAGNITUDE) return false;
  if (in.base != nullptr && in.base_dtype != DTYPE_BFLOAT16) return false;
  for (int i = 0; i < in.n; ++i) {
    if (in.model_dtypes[i] != DTYPE_BFLOAT16) return false;
    const int mode = ctx.models[i].mode;
    if (mode != MODE_BAND && mode != MODE_KEEP_ALL && mode != MODE_KEEP_NONE && mode != MODE_DARE)
      return false;
  }
  return true;
}

template <int COMBINE, int NS>
inline bool fast_block_any(const MergeCtx& ctx, const FmModel* models, int64_t s0, int len,
                           float (*uu)[kBlock]) {
  return ctx.in->base != nullptr ? fast_block<COMBINE, NS, true>(ctx, models, s0, len, uu)
                                 : fast_block<COMBINE, NS, false>(ctx, models, s0, len, uu);
}
#undef FM_AVX512_FN
#undef FM_AVX512_INLINE
#endif  // FM_MERGE_AVX512

}  // namespace detail
}  // namespace cpu
}  // namespace fastmerge
