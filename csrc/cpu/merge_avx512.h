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
// One target for the AVX-512 kernels (merge, DARE statistics): every CPU with these has BMI2,
// and a lambda handed to dare_keep_groups needs its caller's exact target to be inlined.
#define FM_AVX512_TARGET "avx512f,avx512bw,avx512dq,avx512vl,bmi2"
#define FM_AVX512_FN __attribute__((target(FM_AVX512_TARGET), noinline))
#define FM_AVX512_INLINE __attribute__((target(FM_AVX512_TARGET), always_inline)) inline
#define FM_AVX512_LAMBDA __attribute__((target(FM_AVX512_TARGET), always_inline))

// keep kinds of the fast path (a model's FmModel::mode and hi decide which)
constexpr int FAST_BAND_INF = 0;  // |t| >= lo
constexpr int FAST_BAND = 1;      // lo <= |t| < hi
constexpr int FAST_ALL = 2;
constexpr int FAST_NONE = 3;
constexpr int FAST_DARE = 4;  // the block's DARE word < threshold (threshold in [1, 2^32 - 1])
constexpr int FAST_DARE_WORDS = 5;  // the same from words drawn beforehand (unaligned blocks)

// The Philox counters of the fused DARE path: one 16-lane Philox4x32-10 per 64 elements (two
// groups of 32), its lanes ordered (lane 2i: counter c + i, lane 2i + 1: counter c + 8 + i) so
// that the even/odd vectors of both groups come out of one in-lane masked shuffle each.
struct DarePhilox {
  __m512i ctr;      // lo32 of the 16 counters of the next step
  uint32_t k0[10];  // round keys
  uint32_t k1[10];
  uint32_t s0;            // round 0's new word 0 (c1 = hi32 of every counter, c2 = 0): hi ^ k0
  uint32_t r1_c2, r1_c3;  // round 1's constants from the broadcast product s0 * M0
};

// the 32-bit halves (hi, lo) of c * m per lane: the even lanes' 64-bit products and the odd
// lanes' (from the lanes shifted down) put back in place by one masked in-lane shuffle each
FM_AVX512_INLINE void dare_mulhilo(__m512i c, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i pe = _mm512_mul_epu32(c, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
  *hi = _mm512_mask_shuffle_epi32(po, 0x5555, pe, _MM_PERM_CDAB);
  *lo = _mm512_mask_shuffle_epi32(pe, 0xAAAA, po, _MM_PERM_CDAB);
}

// Set up for the run of counters c, c + 1, ... (all with hi32 equal to c's: the caller checks).
FM_AVX512_INLINE void dare_philox_init(DarePhilox* st, uint32_t key_lo, uint32_t key_hi,
                                       uint64_t c) {
  st->ctr =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c))),
                       _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15));
  for (int r = 0; r < 10; ++r) {
    st->k0[r] = key_lo + static_cast<uint32_t>(r) * PHILOX_W0;
    st->k1[r] = key_hi + static_cast<uint32_t>(r) * PHILOX_W1;
  }
  st->s0 = static_cast<uint32_t>(c >> 32) ^ st->k0[0];
  uint32_t h, l;
  fm_mulhilo32(PHILOX_M0, st->s0, &h, &l);
  st->r1_c2 = h ^ st->k1[1];
  st->r1_c3 = l;
}

// The keep masks (word < thr) of the next 64 * S elements in even/odd order (keep[2g + h]:
// group g of 32, half h as fast_model's t[h]), S independent 16-lane Philox states interleaved
// so one state's multiplies hide the other's latency; the counters advance by 16 * S. Rounds
// 0 and 1 multiply one word only: c1 is the same in every lane and c2 = c3 = 0 at the start,
// so the other product is 0 (round 0) or the broadcast s0 * M0 (round 1).
template <int S>
FM_AVX512_INLINE void dare_keep64(DarePhilox* st, __m512i thr, __mmask16* keep) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(PHILOX_M0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(PHILOX_M1));
  __m512i c0[S], c1[S], c2[S], c3[S];
  for (int k = 0; k < S; ++k) {
    __m512i hi0, lo0, hi1, lo1;
    const __m512i ctr = _mm512_add_epi32(st->ctr, _mm512_set1_epi32(16 * k));
    dare_mulhilo(ctr, m0, &hi0, &lo0);  // round 0
    const __m512i r1 = _mm512_xor_si512(hi0, _mm512_set1_epi32(static_cast<int>(st->k1[0])));
    dare_mulhilo(r1, m1, &hi1, &lo1);  // round 1
    c0[k] = _mm512_xor_si512(hi1, _mm512_set1_epi32(static_cast<int>(st->k0[1])));
    c1[k] = lo1;
    c2[k] = _mm512_xor_si512(lo0, _mm512_set1_epi32(static_cast<int>(st->r1_c2)));
    c3[k] = _mm512_set1_epi32(static_cast<int>(st->r1_c3));
  }
  for (int r = 2; r < 10; ++r) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(st->k0[r]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(st->k1[r]));
    for (int k = 0; k < S; ++k) {
      __m512i hi0, lo0, hi1, lo1;
      dare_mulhilo(c0[k], m0, &hi0, &lo0);
      dare_mulhilo(c2[k], m1, &hi1, &lo1);
      // x ^ y ^ z in one instruction (truth table 0x96)
      c0[k] = _mm512_ternarylogic_epi32(hi1, c1[k], k0, 0x96);
      c2[k] = _mm512_ternarylogic_epi32(hi0, c3[k], k1, 0x96);
      c1[k] = lo1;
      c3[k] = lo0;
    }
  }
  st->ctr = _mm512_add_epi32(st->ctr, _mm512_set1_epi32(16 * S));
  // group 0's even elements 2j: word 0 (j even) or 2 (j odd) of counter j / 2, in lane j or
  // j - 1; its odd elements words 1 / 3; group 1 the same from the odd lanes
  for (int k = 0; k < S; ++k) {
    __mmask16* q = keep + 4 * k;
    q[0] = _mm512_cmplt_epu32_mask(_mm512_mask_shuffle_epi32(c0[k], 0xAAAA, c2[k], _MM_PERM_CDAB),
                                   thr);
    q[1] = _mm512_cmplt_epu32_mask(_mm512_mask_shuffle_epi32(c1[k], 0xAAAA, c3[k], _MM_PERM_CDAB),
                                   thr);
    q[2] = _mm512_cmplt_epu32_mask(_mm512_mask_shuffle_epi32(c2[k], 0x5555, c0[k], _MM_PERM_CDAB),
                                   thr);
    q[3] = _mm512_cmplt_epu32_mask(_mm512_mask_shuffle_epi32(c3[k], 0x5555, c1[k], _MM_PERM_CDAB),
                                   thr);
  }
}

// group(g, even, odd) for each group of 32 elements of a block of len (a multiple of 32), with
// the keep masks of its even / odd elements drawn from the counters of j0 (dare_fused_applies):
// one 16-lane Philox step per 64 elements, two states interleaved while 128 remain. The merge
// (fast_model) and the statistics pass (stats_avx512.cpp) draw their masks through this loop.
template <class Group>
FM_AVX512_INLINE void dare_keep_groups(const FmModel& p, uint64_t j0, int len, Group&& group) {
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(p.dare_threshold & 0xFFFFFFFFu));
  DarePhilox ph;
  dare_philox_init(&ph, p.key_lo, p.key_hi, j0 >> 2);
  int g = 0;
  for (; g + 128 <= len; g += 128) {
    __mmask16 k[8];
    dare_keep64<2>(&ph, thr, k);
    group(g, k[0], k[1]);
    group(g + 32, k[2], k[3]);
    group(g + 64, k[4], k[5]);
    group(g + 96, k[6], k[7]);
  }
  for (; g < len; g += 64) {
    __mmask16 k[4];
    dare_keep64<1>(&ph, thr, k);
    group(g, k[0], k[1]);
    if (g + 32 < len) group(g + 32, k[2], k[3]);
  }
}

// Whether the fused DARE path serves the block of len elements at global index j0: j0 a
// multiple of 4 (element 4c + w is word w of counter c) and the counters of every 64-element
// step, the padding of a last 32 included, within one 2^32 run of hi32.
inline bool dare_fused_applies(uint64_t j0, int len) {
  if ((j0 & 3) != 0) return false;
  const uint64_t c = j0 >> 2, last = c + 16 * static_cast<uint64_t>((len + 63) / 64) - 1;
  return (c >> 32) == (last >> 32);
}

// 32 bf16 values as float32 without a shuffle: of a 32-bit lane holding elements 2j (low half)
// and 2j + 1 (high half), x << 16 is element 2j and x & 0xFFFF0000 element 2j + 1.
FM_AVX512_INLINE void widen_even_odd(const uint16_t* p, __m512* even, __m512* odd) {
  const __m512i x = _mm512_loadu_si512(p);
  *even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  *odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// u = w * sparsify(t) and vote += u for the group of 32 elements at g (see fast_model); keep:
// the DARE keep masks of its halves. Returns max(amax, the |t| bit patterns).
template <int KIND, bool HAS_BASE, bool MUL_R, bool MUL_W, bool FIRST, bool STORE>
FM_AVX512_INLINE __m512i fast_group(const uint16_t* __restrict m, const float* __restrict bb,
                                    const FmModel& p, int g, __mmask16 keep0, __mmask16 keep1,
                                    float* __restrict u, float* __restrict vote, __m512i amax) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 lo = _mm512_set1_ps(p.lo), hi = _mm512_set1_ps(p.hi);
  const __m512 r = _mm512_set1_ps(p.rescale), w = _mm512_set1_ps(p.weight);
  const __mmask16 dare_keep[2] = {keep0, keep1};
  __m512 t[2];
  widen_even_odd(m + g, &t[0], &t[1]);
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
    } else if (KIND == FAST_DARE || KIND == FAST_DARE_WORDS) {
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
  return amax;
}

// Per model, u = w * sparsify(t) over one block in even/odd order (32 elements a group:
// positions 32g + j and 32g + 16 + j hold elements 32g + 2j and 32g + 2j + 1), stored to u
// when the combine reads it (STORE: TIES), and vote += u (vote = 0 + u for the first model,
// as fm_ties / fm_sum start from +0). Returns the largest |t| bit pattern (>= 0x7F800000: a
// non-finite value is present).
// DARE: the words drawn here from the counters of j0 (FAST_DARE, j0 a multiple of 4), or dw,
// the block's words in element order (FAST_DARE_WORDS), taken in the same even/odd order.
template <int KIND, bool HAS_BASE, bool MUL_R, bool MUL_W, bool FIRST, bool STORE>
FM_AVX512_INLINE uint32_t fast_model(const uint16_t* __restrict m, const float* __restrict bb,
                                     int len, const FmModel& p, uint64_t j0,
                                     const uint32_t* __restrict dw, float* __restrict u,
                                     float* __restrict vote) {
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(p.dare_threshold & 0xFFFFFFFFu));
  __m512i amax = _mm512_setzero_si512();
#define FM_GROUP(g, k0, k1) \
  amax = fast_group<KIND, HAS_BASE, MUL_R, MUL_W, FIRST, STORE>(m, bb, p, g, k0, k1, u, vote, amax)
  if (KIND == FAST_DARE) {  // one 16-lane Philox step per 64 elements, no per-element branch
    dare_keep_groups(p, j0, len, [&](int g, __mmask16 k0, __mmask16 k1) FM_AVX512_LAMBDA {
      FM_GROUP(g, k0, k1);
    });
  } else {
    const __m512i even_idx =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd_idx =
        _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int g = 0; g < len; g += 32) {
      __mmask16 k0 = 0, k1 = 0;
      if (KIND == FAST_DARE_WORDS) {
        const __m512i w0 = _mm512_load_si512(dw + g), w1 = _mm512_load_si512(dw + g + 16);
        k0 = _mm512_cmplt_epu32_mask(_mm512_permutex2var_epi32(w0, even_idx, w1), thr);
        k1 = _mm512_cmplt_epu32_mask(_mm512_permutex2var_epi32(w0, odd_idx, w1), thr);
      }
      FM_GROUP(g, k0, k1);
    }
  }
#undef FM_GROUP
  return _mm512_reduce_max_epu32(amax);
}

template <bool HAS_BASE, bool FIRST, bool STORE>
FM_AVX512_INLINE uint32_t fast_model_kind(const uint16_t* m, const float* bb, int len,
                                          const FmModel& p, uint64_t j0, const uint32_t* dw,
                                          float* u, float* vote) {
  const bool mul_r = p.rescale != 1.0f, mul_w = p.weight != 1.0f;
  int kind = FAST_NONE;
  if (p.mode == MODE_KEEP_ALL) kind = FAST_ALL;
  if (p.mode == MODE_BAND) kind = p.hi == fm_inf() ? FAST_BAND_INF : FAST_BAND;
  if (p.mode == MODE_DARE) {  // a threshold of 2^32 or more keeps all, 0 none (w < thr)
    kind = p.dare_threshold == 0              ? FAST_NONE
           : p.dare_threshold > 0xFFFFFFFFull ? FAST_ALL
                                              : (dw != nullptr ? FAST_DARE_WORDS : FAST_DARE);
  }
#define FM_FAST_ARGS m, bb, len, p, j0, dw, u, vote
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
    FM_FAST_CASE(FAST_DARE_WORDS)
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
// straight from the even/odd halves, other dtypes through a float32 block. Returns whether
// some value stored is NaN/Inf, as store_block (for bf16 a max over the words written).
template <bool HAS_BASE>
FM_AVX512_INLINE bool fast_store(const float* __restrict q, const float* __restrict bb, float scale,
                                 int len, void* out, int out_dtype, int64_t s0) {
  const __m512 vs = _mm512_set1_ps(scale);
  const bool mul = scale != 1.0f;
  if (out_dtype == DTYPE_BFLOAT16) {
    const __m512i odd_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m512i magnitude = _mm512_set1_epi16(0x7FFF);
    __m512i amax = _mm512_setzero_si512();
    uint16_t* dst = static_cast<uint16_t*>(out) + s0;
    for (int g = 0; g < len; g += 32) {
      const __m512i e =
          _mm512_srli_epi32(fast_round_bf16(fast_value<HAS_BASE>(q, bb, vs, mul, g)), 16);
      const __m512i o = fast_round_bf16(fast_value<HAS_BASE>(q, bb, vs, mul, g + 16));
      // e | (o & 0xFFFF0000)
      const __m512i packed = _mm512_ternarylogic_epi32(e, o, odd_mask, 0xF8);
      _mm512_storeu_si512(dst + g, packed);
      amax = _mm512_max_epu16(amax, _mm512_and_si512(packed, magnitude));
    }
    return _mm512_cmpge_epu16_mask(amax, _mm512_set1_epi16(0x7F80)) != 0;
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
  return store_block(out, out_dtype, s0, len, ob);
}

// One block [s0, s0 + len) of a fast-path merge (len a multiple of 32): false, with nothing
// written, when a task-vector value is not finite (the caller then runs the generic block).
// u: CAP rows of kBlock floats; *bad: whether some value written is NaN/Inf.
template <int COMBINE, int NS, bool HAS_BASE>
FM_AVX512_FN bool fast_block(const MergeCtx& ctx, const FmModel* models, int64_t s0, int len,
                             float (*uu)[kBlock], bool* bad) {
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
  // DARE words: drawn inside the model's loop, or (a block not starting at a multiple of 4 or
  // crossing a 2^32 counter boundary) beforehand by philox_block.cpp
  const uint64_t j0 = static_cast<uint64_t>(ctx.offset + s0);
  const bool dare_fused = dare_fused_applies(j0, len);
  alignas(64) uint32_t words[kBlock];
  for (int i = 0; i < n; ++i) {
    const uint16_t* m = static_cast<const uint16_t*>(in.models[i]) + s0;
    const uint32_t* dw = nullptr;
    if (models[i].mode == MODE_DARE && !dare_fused) {
      philox_dare_block(models[i].key_lo, models[i].key_hi, j0, len, words);
      dw = words;
    }
    const uint32_t a =
        i == 0
            ? fast_model_kind<HAS_BASE, true, kStore>(m, bb, len, models[i], j0, dw, uu[i], vote)
            : fast_model_kind<HAS_BASE, false, kStore>(m, bb, len, models[i], j0, dw, uu[i], vote);
    amax = a > amax ? a : amax;
  }
  if (amax >= 0x7F800000u) return false;
  fast_combine<COMBINE, NS>(cfg, models, uu, vote, len, q);
  *bad = fast_store<HAS_BASE>(q, bb, cfg.scale, len, ctx.out, ctx.out_dtype, s0);
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
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("bmi2");
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
                           float (*uu)[kBlock], bool* bad) {
  return ctx.in->base != nullptr ? fast_block<COMBINE, NS, true>(ctx, models, s0, len, uu, bad)
                                 : fast_block<COMBINE, NS, false>(ctx, models, s0, len, uu, bad);
}
#endif  // FM_MERGE_AVX512

}  // namespace detail
}  // namespace cpu
}  // namespace fastmerge
