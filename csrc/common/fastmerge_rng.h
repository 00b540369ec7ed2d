// fastmerge shared code: counter-based randomness of the DARE masks (docs/semantics.md,
// "DARE's random mask"). Bit-identical to fastmerge/methods/rng.py. Compiled by the CPU backend
// (g++) and the CUDA backend (nvcc) alike.
#pragma once

#include "fastmerge_config.h"

namespace fastmerge {

constexpr uint64_t GOLDEN_GAMMA = 0x9E3779B97F4A7C15ull;
constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;

FM_HD inline uint64_t fm_splitmix64(uint64_t x) {
  uint64_t z = x + GOLDEN_GAMMA;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// 64-bit FNV-1a of a byte string (the UTF-8 tensor name)
FM_HD inline uint64_t fm_fnv1a64(const char* bytes, uint64_t len) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (uint64_t i = 0; i < len; ++i) {
    h ^= static_cast<uint8_t>(bytes[i]);
    h *= 0x100000001B3ull;
  }
  return h;
}

// key of (seed, tensor name, model index): splitmix64(seed ^ fnv1a64(name) ^ i * golden)
FM_HD inline uint64_t fm_dare_key(uint64_t seed, const char* name, uint64_t name_len,
                                  uint64_t model_index) {
  return fm_splitmix64(seed ^ fm_fnv1a64(name, name_len) ^ (model_index * GOLDEN_GAMMA));
}

FM_HD FM_FORCE_INLINE void fm_mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11; Random123's philox4x32_10), in place.
FM_HD FM_FORCE_INLINE void fm_philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    fm_mulhilo32(PHILOX_M0, c0, &hi0, &lo0);
    fm_mulhilo32(PHILOX_M1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  ctr[0] = c0;
  ctr[1] = c1;
  ctr[2] = c2;
  ctr[3] = c3;
}

// The DARE word of element j (semantics v2): word j & 3 of Philox(counter (lo32(c), hi32(c), 0, 0),
// key (key_lo, key_hi)) with c = j >> 2, so one Philox call serves four consecutive elements
// (the CPU block code draws each counter once; a per-element caller such as a GPU thread
// draws it for its own element only).
FM_HD FM_FORCE_INLINE uint32_t fm_philox_dare_word(uint32_t key_lo, uint32_t key_hi, uint64_t j) {
  const uint64_t c = j >> 2;
  uint32_t w[4] = {static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u};
  fm_philox4x32_10(w, key_lo, key_hi);
  const uint32_t k = static_cast<uint32_t>(j & 3);  // selects, not w[k]: no local memory on GPUs
  return k == 0 ? w[0] : k == 1 ? w[1] : k == 2 ? w[2] : w[3];
}

// DARE keep: the word < floor(d * 2^32) (threshold >= 2^32 keeps everything)
FM_HD FM_FORCE_INLINE bool fm_dare_keep(uint32_t key_lo, uint32_t key_hi, uint64_t threshold,
                                        uint64_t j) {
  return static_cast<uint64_t>(fm_philox_dare_word(key_lo, key_hi, j)) < threshold;
}

}  // namespace fastmerge
