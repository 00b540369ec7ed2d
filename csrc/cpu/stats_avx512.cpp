// fastmerge CPU backend: the L1 statistics of one model over one block on AVX-512 (the
// statistics pass of rescale="l1", model_stats in merge.cpp).
//
// Why: the generic block code draws the DARE words into a buffer (philox_block.cpp), writes the
// sparsified block and sums it again; here the keep decisions come from the merge's own fused
// Philox (dare_keep64 of merge_avx512.h, the same words in the same order) straight into mask
// registers, and the sums are two float64 vectors per model kept in registers for the block.
// Same sums, bit for bit: lane l of the 8 float64 lanes adds |t| of the block's elements
// k = l (mod 8) in element order, exactly as l1_sums in merge.cpp (the elements are loaded in
// element order, the even/odd DARE masks interleaved back with pdep); a dropped element adds
// nothing where the generic code adds |t * 0| = +0 (x + 0 = x for the lanes, which start at
// +0 and never become -0). A block with a NaN/Inf task-vector value (where |t * 0| is NaN),
// a length not a multiple of 32 or a keep mode other than DARE / all / none / magnitude band
// is left to the generic code (returns false with nothing added).
#include "stats_avx512.h"

#include "merge_impl.h"

namespace fastmerge {
namespace cpu {
namespace detail {

#ifdef FM_MERGE_AVX512

namespace {

// keep kinds of this path
constexpr int ST_ALL = 0, ST_NONE = 1, ST_DARE = 2, ST_DARE_WORDS = 3, ST_BAND = 4;

// |t| of the 8 elements k..k+7 in element order (m: bf16 bits or float32), 256 bits wide:
// half the work of a 512-bit operation where the float64 sums need 8 lanes at a time anyway
template <bool SRC_BF16, bool HAS_BASE>
FM_AVX512_INLINE __m256 abs_task8(const void* m, const float* bb, int k) {
  __m256 t;
  if (SRC_BF16) {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(m) + k));
    t = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    t = _mm256_loadu_ps(static_cast<const float*>(m) + k);
  }
  if (HAS_BASE) t = _mm256_sub_ps(t, _mm256_loadu_ps(bb + k));
  return _mm256_castsi256_ps(
      _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0x7FFFFFFF)));
}

// The running sums over 32 elements at g whose keep bits (element order) are keep32.
template <int KIND, bool SRC_BF16, bool HAS_BASE>
FM_AVX512_INLINE void sums32(const void* m, const float* bb, const FmModel& p, int g,
                             uint32_t keep32, __m512d* tot, __m512d* kept) {
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const __m256 a = abs_task8<SRC_BF16, HAS_BASE>(m, bb, g + 8 * q);
    __mmask8 keep8 = static_cast<__mmask8>(keep32 >> (8 * q));
    if (KIND == ST_BAND) {  // fm_band_keep(|t|, lo, hi)
      keep8 = _mm256_cmp_ps_mask(a, _mm256_set1_ps(p.lo), _CMP_GE_OQ);
      if (p.hi != fm_inf())
        keep8 = _mm256_mask_cmp_ps_mask(keep8, a, _mm256_set1_ps(p.hi), _CMP_LT_OQ);
    }
    const __m512d d = _mm512_cvtps_pd(a);
    *tot = _mm512_add_pd(*tot, d);
    if (KIND == ST_ALL) {
      *kept = _mm512_add_pd(*kept, d);
    } else if (KIND != ST_NONE) {
      *kept = _mm512_mask_add_pd(*kept, keep8, *kept, d);
    }
  }
}

// element-order keep bits of a group of 32 from its even / odd halves (dare_keep64's order)
FM_AVX512_INLINE uint32_t interleave(__mmask16 even, __mmask16 odd) {
  return _pdep_u32(even, 0x55555555u) | _pdep_u32(odd, 0xAAAAAAAAu);
}

template <int KIND, bool SRC_BF16, bool HAS_BASE>
FM_AVX512_FN bool stats_model(const void* m, const float* bb, const FmModel& p, uint64_t j0,
                              int len, double* tot8, double* kept8) {
  __m512d tot = _mm512_loadu_pd(tot8), kept = _mm512_loadu_pd(kept8);
#define FM_SUMS32(g, keep) sums32<KIND, SRC_BF16, HAS_BASE>(m, bb, p, g, keep, &tot, &kept)
  if (KIND == ST_DARE) {  // the merge pass's fused Philox: one 16-lane step per 64 elements
    dare_keep_groups(p, j0, len, [&](int g, __mmask16 even, __mmask16 odd) FM_AVX512_LAMBDA {
      FM_SUMS32(g, interleave(even, odd));
    });
  } else if (KIND == ST_DARE_WORDS) {  // a block the fused counters do not serve
    const __m512i thr = _mm512_set1_epi32(static_cast<int>(p.dare_threshold & 0xFFFFFFFFu));
    alignas(64) uint32_t w[kBlock];
    philox_dare_block(p.key_lo, p.key_hi, j0, len, w);
    for (int g = 0; g < len; g += 32) {
      const uint32_t k0 = _mm512_cmplt_epu32_mask(_mm512_load_si512(w + g), thr);
      const uint32_t k1 = _mm512_cmplt_epu32_mask(_mm512_load_si512(w + g + 16), thr);
      FM_SUMS32(g, k0 | (k1 << 16));
    }
  } else {
    for (int g = 0; g < len; g += 32) FM_SUMS32(g, 0u);
  }
#undef FM_SUMS32
  // a NaN/Inf |t| makes its tot lane NaN/Inf (a float64 sum of float32 magnitudes cannot
  // overflow), so finite lanes mean a finite block (lanes already non-finite: the generic code)
  if (_mm512_fpclass_pd_mask(tot, 0x99) != 0) return false;  // QNaN, +Inf, -Inf, SNaN
  _mm512_storeu_pd(tot8, tot);
  _mm512_storeu_pd(kept8, kept);
  return true;
}

template <int KIND>
inline bool stats_kind(const void* m, bool bf16, const float* bb, const FmModel& p, uint64_t j0,
                       int len, double* tot8, double* kept8) {
  if (bb != nullptr) {
    return bf16 ? stats_model<KIND, true, true>(m, bb, p, j0, len, tot8, kept8)
                : stats_model<KIND, false, true>(m, bb, p, j0, len, tot8, kept8);
  }
  return bf16 ? stats_model<KIND, true, false>(m, bb, p, j0, len, tot8, kept8)
              : stats_model<KIND, false, false>(m, bb, p, j0, len, tot8, kept8);
}

// a float16 block as float32, vectorised for this instruction set
FM_AVX512_FN void load_half_block(const void* p, int64_t s0, int len, float* dst) {
  load_block(p, DTYPE_FLOAT16, s0, len, dst);
}

}  // namespace

bool stats_fast_applies(const Inputs& in) {
  static const bool cpu_ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("bmi2");
  }();
  return cpu_ok && merge_fast_path_enabled() && !in.has_moments;
}

bool stats_block_fast(const Inputs& in, int i, const FmModel& p, int score, const float* bb,
                      int64_t s0, uint64_t j0, int len, float* scratch, double* tot8,
                      double* kept8) {
  if (len % 32 != 0) return false;
  int kind;
  switch (p.mode) {
    case MODE_KEEP_ALL: kind = ST_ALL; break;
    case MODE_KEEP_NONE: kind = ST_NONE; break;
    case MODE_BAND:
      if (score != SCORE_MAGNITUDE) return false;
      kind = ST_BAND;
      break;
    case MODE_DARE:  // a threshold of 2^32 or more keeps all, 0 none (word < threshold)
      kind = p.dare_threshold == 0              ? ST_NONE
             : p.dare_threshold > 0xFFFFFFFFull ? ST_ALL
             : dare_fused_applies(j0, len)      ? ST_DARE
                                                : ST_DARE_WORDS;
      break;
    default: return false;
  }
  const int dtype = in.model_dtypes[i];
  // the cache lines of the block kPrefetchAhead on: the Philox work between the loads leaves
  // the hardware prefetcher behind (as in the merge pass)
  const int64_t p0 = s0 + kPrefetchAhead;
  if (p0 < in.numel) {
    const int plen = static_cast<int>(in.numel - p0 < kBlock ? in.numel - p0 : kBlock);
    if (i == 0 && in.base != nullptr) prefetch_block(in.base, in.base_dtype, p0, plen);
    prefetch_block(in.models[i], dtype, p0, plen);
  }
  const void* m;
  if (dtype == DTYPE_BFLOAT16) {
    m = static_cast<const uint16_t*>(in.models[i]) + s0;
  } else if (dtype == DTYPE_FLOAT32) {
    m = static_cast<const float*>(in.models[i]) + s0;
  } else {  // float16: a float32 block first
    load_half_block(in.models[i], s0, len, scratch);
    m = scratch;
  }
  const bool bf16 = dtype == DTYPE_BFLOAT16;
  switch (kind) {
    case ST_ALL: return stats_kind<ST_ALL>(m, bf16, bb, p, j0, len, tot8, kept8);
    case ST_NONE: return stats_kind<ST_NONE>(m, bf16, bb, p, j0, len, tot8, kept8);
    case ST_BAND: return stats_kind<ST_BAND>(m, bf16, bb, p, j0, len, tot8, kept8);
    case ST_DARE: return stats_kind<ST_DARE>(m, bf16, bb, p, j0, len, tot8, kept8);
    default: return stats_kind<ST_DARE_WORDS>(m, bf16, bb, p, j0, len, tot8, kept8);
  }
}

#else  // no AVX-512 path on this compiler / architecture

bool stats_fast_applies(const Inputs&) { return false; }
bool stats_block_fast(const Inputs&, int, const FmModel&, int, const float*, int64_t, uint64_t, int,
                      float*, double*, double*) {
  return false;
}

#endif  // FM_MERGE_AVX512

}  // namespace detail
}  // namespace cpu
}  // namespace fastmerge
