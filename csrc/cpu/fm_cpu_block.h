// fastmerge CPU backend: block-wise loads/stores and threading helpers shared by the kernels.
//
// The kernels walk their element range in blocks of kBlock elements: every input block is
// converted to float32 once into a small stack buffer (vectorised loops, one per dtype), the
// per-element work reads those buffers, and the output block is rounded to its dtype in one
// more vectorised loop. Each range function is compiled for several instruction sets
// (FM_CPU_CLONES: AVX-512, AVX2, baseline) and the loader picks the best one at run time.
#pragma once

#include <stdint.h>
#include <string.h>

#include "fm_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTMERGE_NO_CLONES)
#define FM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_CPU_CLONES
#endif

namespace fastmerge {
namespace cpu {

constexpr int kBlock = 512;
// elements per dynamically scheduled work item of the threaded passes
constexpr int64_t kChunk = int64_t{kBlock} * 128;

FM_FORCE_INLINE void load_block(const void* p, int dtype, int64_t start, int len,
                                float* __restrict dst) {
  if (dtype == DTYPE_BFLOAT16) {
    const uint16_t* __restrict s = static_cast<const uint16_t*>(p) + start;
    for (int k = 0; k < len; ++k) dst[k] = fm_bf16_to_float(s[k]);
  } else if (dtype == DTYPE_FLOAT16) {
    const uint16_t* __restrict s = static_cast<const uint16_t*>(p) + start;
    for (int k = 0; k < len; ++k) dst[k] = fm_half_to_float(s[k]);
  } else {
    memcpy(dst, static_cast<const float*>(p) + start, sizeof(float) * static_cast<size_t>(len));
  }
}

// dst = m_i - b (b = bb, already float32), the task vector block of model i
FM_FORCE_INLINE void load_task_block(const void* p, int dtype, int64_t start, int len,
                                     const float* __restrict bb, bool has_base,
                                     float* __restrict dst) {
  load_block(p, dtype, start, len, dst);
  if (has_base) {
    for (int k = 0; k < len; ++k) dst[k] = fm_sub(dst[k], bb[k]);
  }
}

FM_FORCE_INLINE int64_t count_nonfinite(const float* __restrict x, int len) {
  int32_t c = 0;
  for (int k = 0; k < len; ++k) c += fm_isfinite(x[k]) ? 0 : 1;
  return c;
}

// Rounds a float32 block to the output dtype and stores it at element `start` of p; returns
// whether some value stored is NaN/Inf (then count_stored counts them on the bits written).
// The test is a max over the stored magnitudes folded into the rounding loop (exponent all
// ones iff NaN/Inf).
FM_FORCE_INLINE bool store_block(void* p, int dtype, int64_t start, int len,
                                 const float* __restrict src) {
  if (dtype == DTYPE_FLOAT32) {
    uint32_t* __restrict d = static_cast<uint32_t*>(p) + start;
    int32_t amax = 0;  // magnitudes as signed: a max the baseline ISA has too
    for (int k = 0; k < len; ++k) {
      const uint32_t x = fm_f2u(src[k]);
      d[k] = x;
      const int32_t a = static_cast<int32_t>(x & 0x7FFFFFFFu);
      amax = a > amax ? a : amax;
    }
    return amax >= 0x7F800000;
  }
  uint16_t* __restrict d = static_cast<uint16_t*>(p) + start;
  if (dtype == DTYPE_BFLOAT16) {
    int16_t amax = 0;
    for (int k = 0; k < len; ++k) {
      const uint16_t x = fm_float_to_bf16(src[k]);
      d[k] = x;
      const int16_t a = static_cast<int16_t>(x & 0x7FFFu);
      amax = a > amax ? a : amax;
    }
    return amax >= 0x7F80;
  }
  return store_half(src, len, d);  // store_half.cpp: F16C / AVX-512 where the CPU has them
}

// The NaN/Inf values of the stored block [start, start + len) of p (the rare path of the
// store's test), added to *stored; out of line, so the kernels' block loops carry no call.
__attribute__((noinline, cold)) inline void count_stored(const void* p, int dtype, int64_t start,
                                                         int len, StoredNonfinite* stored) {
  const int64_t size = dtype == DTYPE_FLOAT32 ? 4 : 2;
  int64_t first = -1;
  const int64_t c =
      count_nonfinite_values(static_cast<const char*>(p) + start * size, len, dtype, &first);
  stored->add(c, start + first);
}

// elements ahead of the current block whose cache lines the fused merge prefetches
constexpr int64_t kPrefetchAhead = int64_t{kBlock} * 2;

// prefetch the cache lines of elements [start, start + len) of p
FM_FORCE_INLINE void prefetch_block(const void* p, int dtype, int64_t start, int len) {
  const int64_t size = dtype == DTYPE_FLOAT32 ? 4 : 2;
  const char* c = static_cast<const char*>(p) + start * size;
  for (int64_t b = 0; b < len * size; b += 64) __builtin_prefetch(c + b, 0, 3);
}

// Whether this is an AMD CPU (prefetch distances were tuned per vendor; see merge_impl.h).
inline bool cpu_is_amd() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd");
  }();
  return amd;
#else
  return false;
#endif
}

// Threads worth using for numel elements (small tensors stay on one thread).
inline int effective_threads(int64_t numel, int nthreads, int64_t min_per_thread) {
  int64_t t = numel / (min_per_thread > 0 ? min_per_thread : 1);
  if (t < 1) t = 1;
  if (t > nthreads) t = nthreads;
  return static_cast<int>(t < 1 ? 1 : t);
}

}  // namespace cpu
}  // namespace fastmerge
