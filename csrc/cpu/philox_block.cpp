// fastmerge CPU backend: the DARE words of a run of elements, many Philox lanes at once.
//
// Semantics v2: element j's word is word j & 3 of Philox4x32-10(key, (lo32(j >> 2), hi32(j >> 2),
// 0, 0)), so one call serves four consecutive elements. The scalar round (fm_philox4x32_10,
// csrc/common/fastmerge_rng.h, the code the GPU runs) is 32x32 -> 64-bit multiplies; x86 has
// no 32-bit vector mulhi, so the lanes below use the widening multiply of the even 32-bit
// lanes (vpmuludq) on the even lanes and on the odd lanes shifted down, as Random123's SIMD
// Philox does, and then put the four output words of each counter back in element order.
// Bit-identical to the scalar code (tests compare every path with fastmerge/methods/rng.py at every
// start modulo 4 and across 2^32 counter boundaries).
#include <string.h>

#include "fm_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FM_X86_SIMD 1
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined operands
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fastmerge {
namespace cpu {
namespace {

// One Philox call per counter; a run that starts or ends inside a group of four keeps its part.
void words_scalar(uint32_t key_lo, uint32_t key_hi, uint64_t j0, int64_t len, uint32_t* out) {
  int64_t k = 0;
  while (k < len) {
    const uint64_t j = j0 + static_cast<uint64_t>(k);
    const uint64_t c = j >> 2;
    uint32_t w[4] = {static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u};
    fm_philox4x32_10(w, key_lo, key_hi);
    for (unsigned q = static_cast<unsigned>(j & 3); q < 4 && k < len; ++q, ++k) out[k] = w[q];
  }
}

#ifdef FM_X86_SIMD
// lanes whose counters share hi32(c): the counters [c, c + L) must not cross a 2^32 boundary
inline bool same_hi(uint64_t c, int lanes) {
  return static_cast<uint32_t>(c) <= 0xFFFFFFFFu - static_cast<uint32_t>(lanes - 1);
}

// Elements before the first multiple of 4 (at most 3, less if the run is shorter), scalar.
inline int64_t head_of(uint64_t j0, int64_t len) {
  const int64_t h = static_cast<int64_t>((4 - (j0 & 3)) & 3);
  return h < len ? h : len;
}

__attribute__((target("avx2"))) void words_avx2(uint32_t key_lo, uint32_t key_hi, uint64_t j0,
                                                int64_t len, uint32_t* out) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(PHILOX_M0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(PHILOX_M1));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t k = head_of(j0, len);
  words_scalar(key_lo, key_hi, j0, k, out);
  for (; k + 32 <= len; k += 32) {  // 8 counters, 32 elements
    const uint64_t c = (j0 + static_cast<uint64_t>(k)) >> 2;
    if (!same_hi(c, 8)) {
      words_scalar(key_lo, key_hi, j0 + static_cast<uint64_t>(k), 32, out + k);
      continue;
    }
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c)), iota);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(c >> 32));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = key_lo, k1 = key_hi;
    for (int r = 0; r < 10; ++r) {
      // 64-bit products of the even lanes and of the odd lanes (shifted down)
      const __m256i pe0 = _mm256_mul_epu32(c0, m0);
      const __m256i po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
      const __m256i pe1 = _mm256_mul_epu32(c2, m1);
      const __m256i po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
    // 4x8 transpose: word w of counter l goes to element 4l + w
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpacklo_epi32(c2, c3);
    const __m256i t2 = _mm256_unpackhi_epi32(c0, c1), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t1), u1 = _mm256_unpackhi_epi64(t0, t1);
    const __m256i u2 = _mm256_unpacklo_epi64(t2, t3), u3 = _mm256_unpackhi_epi64(t2, t3);
    __m256i* o = reinterpret_cast<__m256i*>(out + k);
    _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
  words_scalar(key_lo, key_hi, j0 + static_cast<uint64_t>(k), len - k, out + k);
}

#define FM_AVX512 __attribute__((target("avx512f"), always_inline)) inline

// (hi, lo) 32-bit halves of c * m per 32-bit lane: the even lanes' 64-bit products (pe) and
// the odd lanes' (po, from the lanes shifted down), put back in place by one in-lane masked
// shuffle each (0xB1 swaps the halves of every 64-bit lane)
FM_AVX512 void mulhilo16(__m512i c, __m512i m, __m512i* hi, __m512i* lo) {
  constexpr __mmask16 kEven = 0x5555, kOdd = 0xAAAA;
  const __m512i pe = _mm512_mul_epu32(c, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
  *hi = _mm512_mask_shuffle_epi32(po, kEven, pe, _MM_PERM_CDAB);
  *lo = _mm512_mask_shuffle_epi32(pe, kOdd, po, _MM_PERM_CDAB);
}

// Philox4x32-10 of 16 counters (c0 = lo32, c1 = hi32 of each; c2 = c3 = 0) per state, two
// independent states interleaved so one state's multiplies hide the other's latency; the
// round keys come from memory (kv: 10 rounds x (k0, k1)).
FM_AVX512 void philox16x2(__m512i* a, __m512i* b, const __m512i* kv) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(PHILOX_M0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(PHILOX_M1));
  for (int r = 0; r < 10; ++r) {
    __m512i ah0, al0, ah1, al1, bh0, bl0, bh1, bl1;
    mulhilo16(a[0], m0, &ah0, &al0);
    mulhilo16(b[0], m0, &bh0, &bl0);
    mulhilo16(a[2], m1, &ah1, &al1);
    mulhilo16(b[2], m1, &bh1, &bl1);
    // x ^ y ^ z in one instruction (truth table 0x96)
    a[0] = _mm512_ternarylogic_epi32(ah1, a[1], kv[2 * r], 0x96);
    b[0] = _mm512_ternarylogic_epi32(bh1, b[1], kv[2 * r], 0x96);
    a[2] = _mm512_ternarylogic_epi32(ah0, a[3], kv[2 * r + 1], 0x96);
    b[2] = _mm512_ternarylogic_epi32(bh0, b[3], kv[2 * r + 1], 0x96);
    a[1] = al1;
    b[1] = bl1;
    a[3] = al0;
    b[3] = bl0;
  }
}

// the four words of 16 counters (w[q] lane l = word q of counter l) to 64 elements in order
FM_AVX512 void store_words16(const __m512i* w, uint32_t* out) {
  // (word 0, word 1) and (word 2, word 3) pairs of counters 0-7 / 8-15, then pairs of pairs
  const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i pair_hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i quad_lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i quad_hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i a_lo = _mm512_permutex2var_epi32(w[0], pair_lo, w[1]);
  const __m512i b_lo = _mm512_permutex2var_epi32(w[2], pair_lo, w[3]);
  const __m512i a_hi = _mm512_permutex2var_epi32(w[0], pair_hi, w[1]);
  const __m512i b_hi = _mm512_permutex2var_epi32(w[2], pair_hi, w[3]);
  _mm512_storeu_si512(out, _mm512_permutex2var_epi64(a_lo, quad_lo, b_lo));
  _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi64(a_lo, quad_hi, b_lo));
  _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi64(a_hi, quad_lo, b_hi));
  _mm512_storeu_si512(out + 48, _mm512_permutex2var_epi64(a_hi, quad_hi, b_hi));
}

FM_AVX512 void counters16(uint64_t c, __m512i* st) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  st[0] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c)), iota);
  st[1] = _mm512_set1_epi32(static_cast<int>(c >> 32));
  st[2] = _mm512_setzero_si512();
  st[3] = _mm512_setzero_si512();
}

__attribute__((target("avx512f"))) void words_avx512(uint32_t key_lo, uint32_t key_hi, uint64_t j0,
                                                     int64_t len, uint32_t* out) {
  __m512i kv[20];
  for (int r = 0; r < 10; ++r) {
    kv[2 * r] = _mm512_set1_epi32(static_cast<int>(key_lo + static_cast<uint32_t>(r) * PHILOX_W0));
    kv[2 * r + 1] =
        _mm512_set1_epi32(static_cast<int>(key_hi + static_cast<uint32_t>(r) * PHILOX_W1));
  }
  int64_t k = head_of(j0, len);
  words_scalar(key_lo, key_hi, j0, k, out);
  while (k + 64 <= len) {  // 32 counters (128 elements) a step where they fit, else 16
    const uint64_t c = (j0 + static_cast<uint64_t>(k)) >> 2;
    const bool two = k + 128 <= len;
    if (!same_hi(c, two ? 32 : 16)) {
      words_scalar(key_lo, key_hi, j0 + static_cast<uint64_t>(k), 64, out + k);
      k += 64;
      continue;
    }
    __m512i a[4], b[4];
    counters16(c, a);
    counters16(c + 16, b);  // not stored when !two (the lanes are cheap beside a branch)
    philox16x2(a, b, kv);
    store_words16(a, out + k);
    if (two) store_words16(b, out + k + 64);
    k += two ? 128 : 64;
  }
  words_scalar(key_lo, key_hi, j0 + static_cast<uint64_t>(k), len - k, out + k);
}
#undef FM_AVX512
#endif

using WordsFn = void (*)(uint32_t, uint32_t, uint64_t, int64_t, uint32_t*);

WordsFn pick(int isa) {
#ifdef FM_X86_SIMD
  __builtin_cpu_init();
  if (isa >= 2 && __builtin_cpu_supports("avx512f")) return words_avx512;
  if (isa >= 1 && __builtin_cpu_supports("avx2")) return words_avx2;
#endif
  (void)isa;
  return words_scalar;
}

}  // namespace

void philox_dare_block(uint32_t key_lo, uint32_t key_hi, uint64_t j0, int64_t len, uint32_t* out) {
  static const WordsFn fn = pick(2);
  fn(key_lo, key_hi, j0, len, out);
}

int philox_dare_isa(uint32_t key_lo, uint32_t key_hi, uint64_t j0, int64_t len, uint32_t* out,
                    int isa) {
  const WordsFn fn = pick(isa);
  fn(key_lo, key_hi, j0, len, out);
#ifdef FM_X86_SIMD
  if (fn == words_avx512) return 2;
  if (fn == words_avx2) return 1;
#endif
  return 0;
}

}  // namespace cpu
}  // namespace fastmerge
