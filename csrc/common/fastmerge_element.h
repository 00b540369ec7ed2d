// fastmerge shared code: everything that happens to ONE element of a merge.
//
// The CPU backend (csrc/cpu) and the CUDA backend (csrc/cuda) compile this very same code, so
// masks and values agree between them by construction. It mirrors backend torch's kernels
// (fastmerge/backends/pytorch: fused_merge_torch, keep_masks_packed, _score_bits) and
// fastmerge/reference.py (combine):
//
//   t_i   = m_i - b                      float32 (m_i itself for the linear combine)
//   keep  = mode 0 | lo <= score < hi | never | fm_philox_dare_word(key, j) < threshold
//   s_i   = (t_i * keep) * rescale_i     the sparsified task vector
//   u_i   = w_i * s_i
//   out   = b + scale * combine(u, s, t, v)     (linear: sum w_i m_i / sum w_i)
//
// Everything is float32 with each operation rounded once (fm_add/fm_mul: no FMA contraction).
#pragma once

#include "fastmerge_config.h"
#include "fastmerge_params.h"
#include "fastmerge_rng.h"

namespace fastmerge {

// ------------------------------------------------------------------ dtype conversions
FM_HD FM_FORCE_INLINE float fm_bf16_to_float(uint16_t h) {
  return fm_u2f(static_cast<uint32_t>(h) << 16);
}

FM_HD FM_FORCE_INLINE float fm_half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (mant << 13);  // Inf / NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else {
    // zero or subnormal: mant * 2^-24, exact in float32
    return fm_u2f(sign | fm_f2u(static_cast<float>(mant) * 5.9604644775390625e-8f));
  }
  return fm_u2f(bits);
}

// float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN
FM_HD FM_FORCE_INLINE uint16_t fm_float_to_bf16(float f) {
  const uint32_t x = fm_f2u(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  const uint32_t rounded = x + 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

// float32 -> IEEE half, round to nearest even (subnormals, overflow to Inf, quiet NaN)
FM_HD FM_FORCE_INLINE uint16_t fm_float_to_half(float f) {
  const uint32_t x = fm_f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: Inf
  if (a >= 0x38800000u) {                                              // normal half
    const uint32_t r = a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u);
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  // subnormal half (or zero): round(|f| * 2^24) to nearest even
  const uint32_t e = a >> 23;
  if (e < 102u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
  const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 .. 24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  return static_cast<uint16_t>(sign | q);
}

// element idx of a raw array of dtype code `dtype`
FM_HD FM_FORCE_INLINE float fm_load(const void* p, int dtype, int64_t idx) {
  if (dtype == DTYPE_BFLOAT16) return fm_bf16_to_float(static_cast<const uint16_t*>(p)[idx]);
  if (dtype == DTYPE_FLOAT16) return fm_half_to_float(static_cast<const uint16_t*>(p)[idx]);
  return static_cast<const float*>(p)[idx];
}

FM_HD FM_FORCE_INLINE void fm_store(void* p, int dtype, int64_t idx, float x) {
  if (dtype == DTYPE_BFLOAT16) {
    static_cast<uint16_t*>(p)[idx] = fm_float_to_bf16(x);
  } else if (dtype == DTYPE_FLOAT16) {
    static_cast<uint16_t*>(p)[idx] = fm_float_to_half(x);
  } else {
    static_cast<float*>(p)[idx] = x;
  }
}

// ------------------------------------------------------------------ scores and keep masks
// the selection score's bit pattern with the sign cleared: |t| or (t * t) * v
FM_HD FM_FORCE_INLINE uint32_t fm_score_bits(float t, float v, int score) {
  const float s = score == SCORE_FISHER ? fm_mul(fm_mul(t, t), v) : t;
  return fm_f2u(s) & 0x7FFFFFFFu;
}

FM_HD FM_FORCE_INLINE float fm_score(float t, float v, int score) {
  return fm_u2f(fm_score_bits(t, v, score));
}

// keep j iff lo <= score < hi (hi = +Inf: no upper bound)
FM_HD FM_FORCE_INLINE bool fm_band_keep(float score, float lo, float hi) {
  return score >= lo && (score < hi || hi == fm_inf());
}

// The keep decision of one model for a keep mode known at compile time (CPU loops hoist the
// mode out of the element loop with this), and for the model's own mode (fm_keep).
template <int MODE>
FM_HD FM_FORCE_INLINE bool fm_keep_mode(const FmModel& m, float t, float v, int score, uint64_t j) {
  if (MODE == MODE_KEEP_ALL) return true;
  if (MODE == MODE_BAND) return fm_band_keep(fm_score(t, v, score), m.lo, m.hi);
  if (MODE == MODE_DARE) return fm_dare_keep(m.key_lo, m.key_hi, m.dare_threshold, j);
  return false;  // MODE_KEEP_NONE
}

// The keep decision of one model at global element index j (DARE counter = j).
FM_HD FM_FORCE_INLINE bool fm_keep(const FmModel& m, float t, float v, int score, uint64_t j) {
  switch (m.mode) {
    case MODE_KEEP_ALL: return fm_keep_mode<MODE_KEEP_ALL>(m, t, v, score, j);
    case MODE_BAND: return fm_keep_mode<MODE_BAND>(m, t, v, score, j);
    case MODE_DARE: return fm_keep_mode<MODE_DARE>(m, t, v, score, j);
    default: return fm_keep_mode<MODE_KEEP_NONE>(m, t, v, score, j);
  }
}

// s_i = (t * keep) * rescale, as ops.fused_merge_torch computes it (t * 0 keeps t's zero sign)
FM_HD FM_FORCE_INLINE float fm_sparsify(float t, bool keep, float rescale) {
  return fm_mul(keep ? t : fm_mul(t, 0.0f), rescale);
}

// OTA: P = max(v, 0)^p, then W_i = w_i * (P * ota_scale_i + eps)
FM_HD FM_FORCE_INLINE float fm_ota_power(float v, float power) {
  return fm_pow(v > 0.0f ? v : 0.0f, power);
}

FM_HD FM_FORCE_INLINE float fm_ota_weight(const FmModel& m, float p, float eps) {
  return fm_mul(m.weight, fm_add(fm_mul(p, m.ota_scale), eps));
}

// ------------------------------------------------------------------ the combine
// TIES election + disjoint merge of u (weighted) / s (unweighted); returns the merged vector.
// Written with selects only (no data-dependent branches) so a CPU loop over elements
// vectorises: agree_i <=> S * e_i > 0 (S = +-1) is "same sign as S, and not zero".
// (sign(e) of the count election is (e > 0) - (e < 0); it differs from torch.sign only for NaN,
// which the kernels report as an error anyway.)
FM_HD FM_FORCE_INLINE float fm_ties(const FmMergeConfig& c, const FmModel* models, const float* s) {
  const int n = c.n;
  const bool unweighted = c.elect_on == ELECT_UNWEIGHTED;
  const bool count_vote = c.elect == ELECT_COUNT;
  float vote = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float u = fm_mul(models[i].weight, s[i]);
    const float e = unweighted ? s[i] : u;
    const float sg = (e > 0.0f ? 1.0f : 0.0f) - (e < 0.0f ? 1.0f : 0.0f);
    vote = fm_add(vote, count_vote ? sg : e);
  }
  const float elected = vote >= 0.0f ? 1.0f : -1.0f;  // S = +1 where the vote is >= 0
  float merged = 0.0f, wsum = 0.0f, count = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float u = fm_mul(models[i].weight, s[i]);
    const float e = unweighted ? s[i] : u;
    const bool agree = fm_mul(elected, e) > 0.0f;  // zeros never agree
    merged = fm_add(merged, agree ? u : 0.0f);
    wsum = fm_add(wsum, agree ? models[i].weight : 0.0f);
    count = fm_add(count, agree ? 1.0f : 0.0f);
  }
  const float count1 = count > 1.0f ? count : 1.0f;
  float divisor =
      c.normalize == NORMALIZE_WEIGHTS ? wsum : (c.normalize == NORMALIZE_COUNT ? count1 : 1.0f);
  divisor = divisor == 0.0f ? 1.0f : divisor;
  return fm_div(merged, divisor);
}

// The divisor of the weighted sum: the same for every element (sum of weights, N or 1; 1 where
// that is 0).
FM_HD FM_FORCE_INLINE float fm_sum_divisor(const FmMergeConfig& c) {
  const float divisor = c.normalize == NORMALIZE_WEIGHTS
                            ? c.sum_weights
                            : (c.normalize == NORMALIZE_COUNT ? static_cast<float>(c.n) : 1.0f);
  return divisor == 0.0f ? 1.0f : divisor;
}

FM_HD FM_FORCE_INLINE float fm_sum(const FmMergeConfig& c, const FmModel* models, const float* s) {
  float merged = 0.0f;
  for (int i = 0; i < c.n; ++i) merged = fm_add(merged, fm_mul(models[i].weight, s[i]));
  return fm_div(merged, fm_sum_divisor(c));
}

// The one per-element combine of every method, parametrised by c.combine / elect / elect_on /
// normalize. t: the N raw task vector values (the model values for COMBINE_LINEAR); s: the N
// sparsified values fm_sparsify(t_i, keep_i, rescale_i); v: the N second moments (read only by
// COMBINE_OTA, may be null otherwise; already fm_ota_power(v_i, power) when c.v_is_power);
// base: b (0 without a base). Returns the output value b + scale * merged in float32
// (linear: sum w_i m_i / sum w_i), before the dtype rounding.
FM_HD FM_FORCE_INLINE float fm_combine(const FmMergeConfig& c, const FmModel* models,
                                       const float* t, const float* s, const float* v, float base) {
  const int n = c.n;
  float merged;
  switch (c.combine) {
    case COMBINE_LINEAR: {
      float acc = 0.0f;
      for (int i = 0; i < n; ++i) acc = fm_add(acc, fm_mul(models[i].weight, t[i]));
      float total = c.normalize != NORMALIZE_NONE ? c.sum_weights : 1.0f;
      if (total == 0.0f) total = 1.0f;
      return fm_div(acc, total);
    }
    case COMBINE_SUM: merged = fm_sum(c, models, s); break;
    case COMBINE_TIES: merged = fm_ties(c, models, s); break;
    case COMBINE_CONSENSUS_SUM:
    case COMBINE_CONSENSUS_TIES: {
      const float mtl =
          c.combine == COMBINE_CONSENSUS_SUM ? fm_sum(c, models, s) : fm_ties(c, models, s);
      int votes = 0;  // TALL masks: |t_i| > l_i * |t_mtl - t_i| (strict)
      for (int i = 0; i < n; ++i) {
        const float rhs = fm_mul(models[i].consensus_lambda, fm_abs(fm_sub(mtl, t[i])));
        votes += fm_abs(t[i]) > rhs ? 1 : 0;
      }
      merged = votes >= c.consensus_k ? mtl : fm_mul(mtl, 0.0f);
      break;
    }
    default: {  // COMBINE_OTA: sum W_i s_i / sum W_i
      float num = 0.0f, den = 0.0f;
      for (int i = 0; i < n; ++i) {
        const float p = c.v_is_power ? v[i] : fm_ota_power(v[i], c.power);
        const float w = fm_ota_weight(models[i], p, c.eps);
        num = fm_add(num, fm_mul(w, s[i]));
        den = fm_add(den, w);
      }
      merged = fm_div(num, den);
      break;
    }
  }
  return fm_add(base, fm_mul(c.scale, merged));
}

// The whole element in one call (what a GPU thread does): keep masks, sparsify, combine.
// t: N task vector values (model values for linear), v: N second moments or null, j: the
// global element index (DARE counter: chunk offset + local index).
FM_HD FM_FORCE_INLINE float fm_merge_element(const FmMergeConfig& c, const FmModel* models,
                                             const float* t, const float* v, float base,
                                             uint64_t j) {
  float s[FM_MAX_MODELS];
  if (c.combine != COMBINE_LINEAR) {
    for (int i = 0; i < c.n; ++i) {
      const bool keep = fm_keep(models[i], t[i], v != nullptr ? v[i] : 0.0f, c.score, j);
      s[i] = fm_sparsify(t[i], keep, models[i].rescale);
    }
  }
  return fm_combine(c, models, t, s, v, base);
}

}  // namespace fastmerge
