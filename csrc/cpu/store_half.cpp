// fastmerge CPU backend: the float16 output store, float32 -> IEEE half with the hardware
// conversion where the CPU has it.
//
// fm_float_to_half (csrc/common/fastmerge_element.h) is the reference and the fallback: round to
// nearest even, |x| >= 65520 to Inf, half subnormals kept, NaN made quiet with its top 10
// mantissa bits kept. VCVTPS2PH with an immediate round-to-nearest-even gives the same bits for
// every float32: it keeps the same NaN payload bits and sets the same quiet bit, MXCSR.FTZ does
// not apply to it, and MXCSR.DAZ could only turn a float32 subnormal into a zero of the same
// sign, which the scalar code gives too (every float32 subnormal is below 2^-25).
// tests/test_store_half.py checks this over all exponents and structured mantissas, per ISA.
#include <atomic>

#include "fm_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FM_HALF_X86 1
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined operands
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fastmerge {
namespace cpu {
namespace {

// the scalar store: the conversion loop, then a max over the float32 magnitudes against
// fm_float_to_half's own Inf bound (folded into the branchy conversion it cost more)
bool half_scalar(const float* __restrict src, int len, uint16_t* __restrict d) {
  for (int k = 0; k < len; ++k) d[k] = fm_float_to_half(src[k]);
  int32_t xmax = 0;
  for (int k = 0; k < len; ++k) {
    const int32_t a = static_cast<int32_t>(fm_f2u(src[k]) & 0x7FFFFFFFu);
    xmax = a > xmax ? a : xmax;
  }
  return xmax >= 0x477FF000;
}

#ifdef FM_HALF_X86
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// 8 lanes per step (F16C); NaN/Inf from a max over the half magnitudes written
__attribute__((target("avx2,f16c"))) bool half_f16c(const float* __restrict src, int len,
                                                    uint16_t* __restrict d) {
  __m128i amax = _mm_setzero_si128();
  const __m128i magnitude = _mm_set1_epi16(0x7FFF);
  int k = 0;
  for (; k + 8 <= len; k += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + k), kRound);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k), h);
    amax = _mm_max_epu16(amax, _mm_and_si128(h, magnitude));
  }
  uint16_t tail = 0;
  for (; k < len; ++k) {
    d[k] = fm_float_to_half(src[k]);
    const uint16_t a = d[k] & 0x7FFFu;
    tail = a > tail ? a : tail;
  }
  amax = _mm_max_epu16(amax, _mm_set1_epi16(static_cast<short>(tail)));
  // any lane >= 0x7C00 <=> max(lane, 0x7C00) == lane somewhere
  const __m128i ge = _mm_cmpeq_epi16(_mm_max_epu16(amax, _mm_set1_epi16(0x7C00)), amax);
  return _mm_movemask_epi8(ge) != 0;
}

// 16 lanes per step, the tail as one masked step
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) bool half_avx512(
    const float* __restrict src, int len, uint16_t* __restrict d) {
  __m256i amax = _mm256_setzero_si256();
  const __m256i magnitude = _mm256_set1_epi16(0x7FFF);
  for (int k = 0; k < len; k += 16) {
    const __mmask16 m = len - k >= 16 ? __mmask16{0xFFFF} : _cvtu32_mask16((1u << (len - k)) - 1u);
    const __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + k), kRound);
    _mm256_mask_storeu_epi16(d + k, m, h);
    amax = _mm256_max_epu16(amax, _mm256_and_si256(h, magnitude));  // masked-off lanes are 0
  }
  return _mm256_cmpge_epu16_mask(amax, _mm256_set1_epi16(0x7C00)) != 0;
}
#endif

using HalfFn = bool (*)(const float* __restrict, int, uint16_t* __restrict);

HalfFn pick(int isa) {
#ifdef FM_HALF_X86
  __builtin_cpu_init();
  if (isa >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c"))
    return half_avx512;
  if (isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
    return half_f16c;
#endif
  (void)isa;
  return half_scalar;
}

std::atomic<int> g_isa{2};
std::atomic<HalfFn> g_half{pick(2)};

}  // namespace

bool store_half(const float* __restrict src, int len, uint16_t* __restrict dst) {
  return g_half.load(std::memory_order_relaxed)(src, len, dst);
}

int set_store_half_isa(int isa) {
  g_half.store(pick(isa), std::memory_order_relaxed);
  return g_isa.exchange(isa);
}

}  // namespace cpu
}  // namespace fastmerge
