// fastmerge CPU backend: exact k-th largest |t_i| in one read pass (topk_window).
//
// The two-level radix selection (histogram.cpp) reads the inputs twice and scatters every
// element into a 65536-bin table: ~0.5 + 0.2-0.3 ns per element and model on 2 threads here
// (AMD EPYC, 4096x4096 bf16). This pass reads them once and scatters nothing:
//   1. A sample of each model's scores (runs of 64 elements at jittered strides, up to 65536
//      values; all of them for small tensors) brackets the k-th largest between two sampled
//      values lo <= hi, 5 standard deviations of the sample rank (+32) on either side.
//   2. One pass counts the scores above hi and copies the scores inside [lo, hi] into
//      per-work-item lists (AVX-512 compress where the CPU has it), except the window's
//      frequent values, which it only counts: bf16 task vectors are discrete (measured on
//      4096x4096 bf16 fine-tunes: the 0.1 and 0.5 quantiles of |t| are single values held by
//      11% and 22% of the elements). Up to kHeavy values holding >= 1/256 of the sampled window
//      are counted by equality; what is copied is then well under 1% of the scores.
//   3. If count above < k <= count above + count inside, the exact k-th largest is found
//      among the counted values and the copied scores. Otherwise (a sample far off, or more
//      than a quarter of the tensor copied) the request reports a miss and the caller
//      runs the radix selection. The result is exact either way: the sample decides only how
//      fast. Sums of |t| for rescale="l1" are gathered per work item and added in item order,
//      so they do not depend on the thread count.
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <type_traits>
#include <vector>

#include "fm_cpu_block.h"
#ifndef FM_SELECT_AHEAD
#define FM_SELECT_AHEAD 4
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 flags _mm512_undefined_pd() inside its own intrinsics as maybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define FM_SELECT_AVX512 1
#endif

namespace fastmerge {
namespace cpu {
namespace {

constexpr uint32_t kNonFinite = 0x7F800000u;  // score bits >= this: Inf or NaN
constexpr int kRun = 64;                      // sampled run length (two 64-byte bf16 lines)
constexpr int kPrefetchRuns = 8;              // runs whose lines are requested ahead
constexpr int64_t kMaxSample = 65536;
// Frequent values: counted by equality, not copied. A value is frequent when it holds at
// least 1/256 of the sample (~0.4% of the tensor): copying it would cost more than the
// compare that counts it.
constexpr int kHeavy = 4;
constexpr int64_t kHeavyShare = 256;
constexpr uint32_t kSelectBins = 4096;
constexpr int64_t kSelectAhead =
    int64_t{kBlock} * FM_SELECT_AHEAD;  // bins of the window when picking among the copies

// Per work item and request: what the pass found (the candidate list is this item's part).
struct Found {
  int64_t above = 0;           // scores > hi
  int64_t inside = 0;          // scores in [lo, hi] that are not frequent values (copied)
  int64_t heavy[kHeavy] = {};  // count of each frequent value
  double above_l1 = 0.0;
  uint32_t* cand = nullptr;  // scores in [lo, hi], in element order (when stored)
  int64_t cap = 0;
};

struct Window {
  int model;
  int64_t k;
  uint32_t lo, hi;
  int nheavy;  // frequent values inside [lo, hi], counted by equality
  uint32_t heavy[kHeavy];
};

struct ScanAcc {
  int64_t above, inside;
  int64_t heavy[kHeavy];
  double above_l1;
};

using ScanFn = void (*)(const uint32_t*, int, const Window&, bool, uint32_t*, ScanAcc*);

// The plain scan (the tails of the vector scans): counts, branch-free copies of the scores
// inside [lo, hi] that are not frequent values (dst has room for len values; nullptr: count
// only).
void scan_scalar(const uint32_t* __restrict bits, int len, const Window& w, bool l1,
                 uint32_t* __restrict dst, ScanAcc* acc) {
  const uint32_t lo = w.lo, hi = w.hi, width = hi - lo;
  int64_t above = 0, inside = 0;
  double s = 0.0;
  for (int k = 0; k < len; ++k) {
    const uint32_t b = bits[k];
    const bool gt = b > hi;
    bool in = b - lo <= width;
    for (int j = 0; j < w.nheavy; ++j) {
      const bool eq = b == w.heavy[j];
      acc->heavy[j] += eq;
      in = in && !eq;
    }
    above += gt;
    if (dst != nullptr) dst[inside] = b;
    inside += in;
    if (l1 && gt) s += static_cast<double>(fm_u2f(b));
  }
  acc->above += above;
  acc->inside += inside;
  acc->above_l1 += s;
}

// The portable scan (CPUs without AVX-512), NH fixed at compile time: the counts in one
// loop the compiler vectorises (multiversioned), then the copies in a branch-free loop.
// Measured here (1 thread, 4096x4096 bf16, 2 frequent values): the per-element loop of
// scan_scalar took ~3.6 ns per element, this ~0.3.
template <int NH>
FM_CPU_CLONES void scan_portable_n(const uint32_t* __restrict bits, int len, const Window& w,
                                   bool l1, uint32_t* __restrict dst, ScanAcc* acc) {
  const uint32_t lo = w.lo, hi = w.hi, width = hi - lo;
  uint32_t hv[NH > 0 ? NH : 1];
  for (int j = 0; j < NH; ++j) hv[j] = w.heavy[j];
  alignas(64) uint8_t keep[kBlock + 8];
  int32_t above = 0, inside = 0;
  int32_t hc[NH > 0 ? NH : 1] = {};
  for (int k = 0; k < len; ++k) {
    const uint32_t b = bits[k];
    int in = b - lo <= width ? 1 : 0;
#pragma GCC unroll 4
    for (int j = 0; j < NH; ++j) {
      const int eq = b == hv[j] ? 1 : 0;
      hc[j] += eq;
      in &= 1 - eq;
    }
    above += b > hi ? 1 : 0;
    inside += in;
    keep[k] = static_cast<uint8_t>(in);
  }
  if (dst != nullptr && inside > 0) {  // the keep bytes 8 at a time: most words are zero
    for (int k = len; k < ((len + 7) & ~7); ++k) keep[k] = 0;
    int q = 0;
    for (int g = 0; g < len; g += 8) {
      uint64_t word;
      memcpy(&word, keep + g, sizeof(word));
      while (word != 0) {
        dst[q++] = bits[g + (__builtin_ctzll(word) >> 3)];
        word &= word - 1;
      }
    }
  }
  if (l1) {
    double sm[8] = {};
    int k = 0;
    for (; k + 8 <= len; k += 8)
      for (int l = 0; l < 8; ++l)
        sm[l] += bits[k + l] > hi ? static_cast<double>(fm_u2f(bits[k + l])) : 0.0;
    for (; k < len; ++k) sm[0] += bits[k] > hi ? static_cast<double>(fm_u2f(bits[k])) : 0.0;
    double t = 0.0;
    for (double x : sm) t += x;
    acc->above_l1 += t;
  }
  for (int j = 0; j < NH; ++j) acc->heavy[j] += hc[j];
  acc->above += above;
  acc->inside += inside;
}

// Calls f(std::integral_constant<int, NH>()) with NH = the window's count of frequent values,
// so each scan is compiled per count.
template <class F>
FM_FORCE_INLINE void with_heavy_count(int nheavy, F&& f) {
  static_assert(kHeavy == 4, "one case per count of frequent values");
  switch (nheavy) {
    case 0: f(std::integral_constant<int, 0>()); break;
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    default: f(std::integral_constant<int, 4>()); break;
  }
}

void scan_portable(const uint32_t* __restrict bits, int len, const Window& w, bool l1,
                   uint32_t* __restrict dst, ScanAcc* acc) {
  with_heavy_count(
      w.nheavy, [&](auto nh) { scan_portable_n<decltype(nh)::value>(bits, len, w, l1, dst, acc); });
}

#ifdef FM_SELECT_AVX512
// 16 scores per step: two mask compares, a register compress (the memory form is slow on
// AMD Zen 4) stored unaligned with the pointer advanced by the popcount; the NH frequent
// values counted in per-lane vector counters (NH fixed at compile time, so they stay in
// registers); sums in 16 float64 lanes. dst needs 16 values of slack.
template <int NH>
__attribute__((target("avx512f,avx,popcnt"))) void scan_avx512_n(const uint32_t* __restrict bits,
                                                                 int len, const Window& w, bool l1,
                                                                 uint32_t* __restrict dst,
                                                                 ScanAcc* acc) {
  const uint32_t lo = w.lo, hi = w.hi;
  __m512i hv[NH > 0 ? NH : 1], hc[NH > 0 ? NH : 1];
  for (int j = 0; j < NH; ++j) {
    hv[j] = _mm512_set1_epi32(static_cast<int>(w.heavy[j]));
    hc[j] = _mm512_setzero_si512();
  }
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int>(hi));
  const __m512i vw = _mm512_set1_epi32(static_cast<int>(hi - lo));
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  int64_t above = 0, inside = 0;
  int k = 0;
  for (; k + 16 <= len; k += 16) {
    const __m512i b = _mm512_loadu_si512(bits + k);
    const __mmask16 gt = _mm512_cmpgt_epu32_mask(b, vhi);
    __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(b, vlo), vw);
#pragma GCC unroll 8
    for (int j = 0; j < NH; ++j) {
      const __mmask16 eq = _mm512_cmpeq_epi32_mask(b, hv[j]);
      hc[j] = _mm512_mask_add_epi32(hc[j], eq, hc[j], one);
      in = static_cast<__mmask16>(in & ~eq);
    }
    above += _mm_popcnt_u32(gt);
    if (dst != nullptr) _mm512_storeu_si512(dst + inside, _mm512_maskz_compress_epi32(in, b));
    inside += _mm_popcnt_u32(in);
    if (l1) {  // the scores as floats, reloaded in halves (cheaper than lane extracts)
      const __m256 f0 = _mm256_loadu_ps(reinterpret_cast<const float*>(bits + k));
      const __m256 f1 = _mm256_loadu_ps(reinterpret_cast<const float*>(bits + k + 8));
      s0 = _mm512_mask_add_pd(s0, static_cast<__mmask8>(gt), s0, _mm512_cvtps_pd(f0));
      s1 = _mm512_mask_add_pd(s1, static_cast<__mmask8>(gt >> 8), s1, _mm512_cvtps_pd(f1));
    }
  }
  ScanAcc rest{};
  scan_scalar(bits + k, len - k, w, l1, dst != nullptr ? dst + inside : nullptr, &rest);
  for (int j = 0; j < NH; ++j) acc->heavy[j] += _mm512_reduce_add_epi32(hc[j]) + rest.heavy[j];
  acc->above += above + rest.above;
  acc->inside += inside + rest.inside;
  if (l1) acc->above_l1 += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1)) + rest.above_l1;
}

void scan_avx512(const uint32_t* __restrict bits, int len, const Window& w, bool l1,
                 uint32_t* __restrict dst, ScanAcc* acc) {
  with_heavy_count(
      w.nheavy, [&](auto nh) { scan_avx512_n<decltype(nh)::value>(bits, len, w, l1, dst, acc); });
}
#endif

// Score bits of one model block: bits[k] = |m - b| as float32 bits, the largest of them
// (returned: >= 0x7F800000 means a NaN/Inf is present) and, with l1, tot[0..7] += |t|.
using ScoreFn = uint32_t (*)(const void*, int, int64_t, const float*, int, bool, uint32_t*,
                             double*);

FM_CPU_CLONES
uint32_t score_block_generic(const void* m, int dtype, int64_t s0, const float* bb, int len,
                             bool l1, uint32_t* __restrict bits, double* __restrict tot) {
  alignas(64) float tt[kBlock];
  load_task_block(m, dtype, s0, len, bb, bb != nullptr, tt);
  uint32_t mx = 0;
  for (int k = 0; k < len; ++k) {
    bits[k] = fm_score_bits(tt[k], 0.0f, SCORE_MAGNITUDE);
    mx = bits[k] > mx ? bits[k] : mx;
  }
  if (l1) {
    int k = 0;
    for (; k + 8 <= len; k += 8)
      for (int l = 0; l < 8; ++l) tot[l] += static_cast<double>(fm_u2f(bits[k + l]));
    for (; k < len; ++k) tot[0] += static_cast<double>(fm_u2f(bits[k]));
  }
  return mx;
}

#ifdef FM_SELECT_AVX512
// The same in one loop for bf16 models: widen, subtract the base block, clear the sign. The
// float32 subtraction is the one fm_sub does (no contraction); same bits as the generic code.
__attribute__((target("avx512f,avx512dq,avx,popcnt"))) uint32_t
score_block_avx512(const void* m, int dtype, int64_t s0, const float* bb, int len, bool l1,
                   uint32_t* __restrict bits, double* __restrict tot) {
  if (dtype != DTYPE_BFLOAT16 || len != kBlock)
    return score_block_generic(m, dtype, s0, bb, len, l1, bits, tot);
  const uint16_t* h = static_cast<const uint16_t*>(m) + s0;
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i mx = _mm512_setzero_si512();
  __m512d t0 = _mm512_setzero_pd(), t1 = _mm512_setzero_pd();
  for (int k = 0; k < kBlock; k += 16) {
    const __m512i w = _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + k))), 16);
    __m512 t = _mm512_castsi512_ps(w);
    if (bb != nullptr) t = _mm512_sub_ps(t, _mm512_loadu_ps(bb + k));
    const __m512i b = _mm512_and_si512(_mm512_castps_si512(t), abs_mask);
    _mm512_storeu_si512(bits + k, b);
    mx = _mm512_max_epu32(mx, b);
    if (l1) {
      const __m512 f = _mm512_castsi512_ps(b);
      t0 = _mm512_add_pd(t0, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
      t1 = _mm512_add_pd(t1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
    }
  }
  if (l1) {
    alignas(64) double a[8], c[8];
    _mm512_store_pd(a, t0);
    _mm512_store_pd(c, t1);
    for (int l = 0; l < 8; ++l) tot[l] += a[l] + c[l];
  }
  return _mm512_reduce_max_epu32(mx);
}
#endif

#ifdef FM_SELECT_AVX512
// bf16 model, bf16 base (or none), one window: the score and the scan of scan_avx512_n in one
// loop, in registers (the two-step form stores the block's scores and the base as float32 and
// reads them back: the pass took ~0.21 ns per element and model on 1 thread here (4096x4096
// x 3, harness), fused ~0.17, of which ~0.10 is the compute alone (in cache)). Returns the
// largest score bits (>= kNonFinite: a NaN/Inf is present; the caller counts them). With l1,
// tot[0..7] += |t| and acc->above_l1 as in scan_avx512_n. len is a multiple of 16.
template <int NH, bool HAS_BASE, bool L1>
__attribute__((target("avx512f,avx512dq,avx,popcnt"))) uint32_t
fused_bf16_n(const uint16_t* __restrict m, const uint16_t* __restrict b, int len, const Window& w,
             uint32_t* __restrict dst, ScanAcc* acc, double* __restrict tot) {
  __m512i hv[NH > 0 ? NH : 1], hc[NH > 0 ? NH : 1];
  for (int j = 0; j < NH; ++j) {
    hv[j] = _mm512_set1_epi32(static_cast<int>(w.heavy[j]));
    hc[j] = _mm512_setzero_si512();
  }
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(w.lo));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int>(w.hi));
  const __m512i vw = _mm512_set1_epi32(static_cast<int>(w.hi - w.lo));
  __m512i mx = _mm512_setzero_si512(), above = _mm512_setzero_si512();
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  __m512d t0 = _mm512_setzero_pd(), t1 = _mm512_setzero_pd();
  int64_t inside = 0;
  for (int k = 0; k < len; k += 16) {
    __m512 t = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + k))), 16));
    if (HAS_BASE)
      t = _mm512_sub_ps(
          t, _mm512_castsi512_ps(_mm512_slli_epi32(
                 _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k))),
                 16)));
    const __m512i s = _mm512_and_si512(_mm512_castps_si512(t), abs_mask);
    mx = _mm512_max_epu32(mx, s);
    const __mmask16 gt = _mm512_cmpgt_epu32_mask(s, vhi);
    above = _mm512_mask_add_epi32(above, gt, above, one);
    __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(s, vlo), vw);
#pragma GCC unroll 8
    for (int j = 0; j < NH; ++j) {
      const __mmask16 eq = _mm512_cmpeq_epi32_mask(s, hv[j]);
      hc[j] = _mm512_mask_add_epi32(hc[j], eq, hc[j], one);
      in = static_cast<__mmask16>(in & ~eq);
    }
    if (dst != nullptr) _mm512_storeu_si512(dst + inside, _mm512_maskz_compress_epi32(in, s));
    inside += _mm_popcnt_u32(in);
    if (L1) {
      const __m512 f = _mm512_castsi512_ps(s);
      const __m512d lo8 = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
      const __m512d hi8 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1));
      t0 = _mm512_add_pd(t0, lo8);
      t1 = _mm512_add_pd(t1, hi8);
      s0 = _mm512_mask_add_pd(s0, static_cast<__mmask8>(gt), s0, lo8);
      s1 = _mm512_mask_add_pd(s1, static_cast<__mmask8>(gt >> 8), s1, hi8);
    }
  }
  for (int j = 0; j < NH; ++j) acc->heavy[j] += _mm512_reduce_add_epi32(hc[j]);
  acc->above += _mm512_reduce_add_epi32(above);
  acc->inside += inside;
  if (L1) {
    acc->above_l1 += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    alignas(64) double a[8], c[8];
    _mm512_store_pd(a, t0);
    _mm512_store_pd(c, t1);
    for (int l = 0; l < 8; ++l) tot[l] += a[l] + c[l];
  }
  return _mm512_reduce_max_epu32(mx);
}

using FusedFn = uint32_t (*)(const uint16_t*, const uint16_t*, int, const Window&, uint32_t*,
                             ScanAcc*, double*);

FusedFn pick_fused(int nheavy, bool has_base, bool l1) {
  FusedFn f = nullptr;
  with_heavy_count(nheavy, [&](auto nh) {
    constexpr int NH = decltype(nh)::value;
    if (has_base)
      f = l1 ? fused_bf16_n<NH, true, true> : fused_bf16_n<NH, true, false>;
    else
      f = l1 ? fused_bf16_n<NH, false, true> : fused_bf16_n<NH, false, false>;
  });
  return f;
}
#endif

ScoreFn pick_score(int isa) {
#ifdef FM_SELECT_AVX512
  __builtin_cpu_init();
  if (isa >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
    return score_block_avx512;
#endif
  (void)isa;
  return score_block_generic;
}

ScanFn pick_scan(int isa) {
#ifdef FM_SELECT_AVX512
  __builtin_cpu_init();
  if (isa >= 2 && __builtin_cpu_supports("avx512f")) return scan_avx512;
#endif
  (void)isa;
  return scan_portable;
}

struct PassCtx {
  const Inputs* in;
  const Window* win;
  int R;
  bool l1;
  ScanFn scan;
  ScoreFn score;
  std::atomic<int64_t>* stored;  // per request: values copied so far (all items)
  const int64_t* store_cap;      // per request: beyond this, stop copying (a miss)
  std::atomic<bool>* overflow;
  bool fused;  // the fused AVX-512 bf16 score + scan may run
};

// The pass over [begin, end): one work item. found[R], totals[N] (sum |t|), nonfinite[N].
// Each model's score bits are computed once for all its windows (breadcrumbs has two).
FM_CPU_CLONES
void window_range(const PassCtx& c, int64_t begin, int64_t end, Found* found, double* totals,
                  int64_t* nonfinite) {
  const Inputs& in = *c.in;
  const bool has_base = in.base != nullptr;
  alignas(64) float bb[kBlock];
  alignas(64) uint32_t bits[kBlock];
  alignas(64) double tot[FM_MAX_MODELS][8] = {};
  bool used[FM_MAX_MODELS] = {};
  int64_t begin_rest[FM_MAX_MODELS] = {};  // where the two-step path starts (per model)
  for (int r = 0; r < c.R; ++r) used[c.win[r].model] = true;
  // Models outer, blocks inner: two input streams at a time (the base's block comes from L2
  // again for each model; an item's base is 128 KiB of bf16). With all N + 1 streams at once
  // the hardware prefetchers lose track: measured here (4096x4096 bf16, 2 threads, nothing
  // copied) N = 8 took 0.18 ns per element and model that way, 0.12 this way.
  // the request's copy list with room for one more block (nullptr: count only)
  auto room = [&](int r, int len) -> uint32_t* {
    const Window& w = c.win[r];
    Found& f = found[r];
    if (!(w.lo < w.hi) || c.overflow[r].load(std::memory_order_relaxed)) return nullptr;
    if (f.cap - f.inside < len + 16) {  // room for a whole block + the SIMD slack
      const int64_t cap = std::max<int64_t>(2 * f.cap, f.inside + len + 16 + 1024);
      void* p = realloc(f.cand, sizeof(uint32_t) * static_cast<size_t>(cap));
      if (p == nullptr) {
        c.overflow[r].store(true, std::memory_order_relaxed);
        return nullptr;
      }
      f.cand = static_cast<uint32_t*>(p);
      f.cap = cap;
    }
    return f.cand + f.inside;
  };
  auto add = [&](int r, const ScanAcc& acc) {
    Found& f = found[r];
    for (int j = 0; j < c.win[r].nheavy; ++j) f.heavy[j] += acc.heavy[j];
    f.above += acc.above;
    f.inside += acc.inside;
    f.above_l1 += acc.above_l1;
  };
  auto count_nonfinite_block = [&](int i, int64_t s0, int len) {
    if (has_base) load_block(in.base, in.base_dtype, s0, len, bb);
    score_block_generic(in.models[i], in.model_dtypes[i], s0, has_base ? bb : nullptr, len, false,
                        bits, nullptr);
    int32_t nb = 0;
    for (int k = 0; k < len; ++k) nb += bits[k] >= kNonFinite ? 1 : 0;
    nonfinite[i] += nb;
  };
  for (int i = 0; i < in.n; ++i) {
    if (!used[i]) continue;
#ifdef FM_SELECT_AVX512
    // one window on a bf16 model (TIES, magnitude_prune): score and scan fused in registers
    int only = -1, nreq = 0;
    for (int r = 0; r < c.R; ++r)
      if (c.win[r].model == i) only = r, ++nreq;
    if (c.fused && nreq == 1 && in.model_dtypes[i] == DTYPE_BFLOAT16 &&
        (!has_base || in.base_dtype == DTYPE_BFLOAT16)) {
      const FusedFn fn = pick_fused(c.win[only].nheavy, has_base, c.l1);
      const uint16_t* mp = static_cast<const uint16_t*>(in.models[i]);
      const uint16_t* bp = static_cast<const uint16_t*>(in.base);
      int64_t s0 = begin;
      for (; s0 + kBlock <= end; s0 += kBlock) {
        if (s0 + kSelectAhead + kBlock <= end)
          prefetch_block(mp, DTYPE_BFLOAT16, s0 + kSelectAhead, kBlock);
        ScanAcc acc{};
        const uint32_t mx = fn(mp + s0, has_base ? bp + s0 : nullptr, kBlock, c.win[only],
                               room(only, kBlock), &acc, tot[i]);
        add(only, acc);
        if (mx >= kNonFinite) count_nonfinite_block(i, s0, kBlock);  // rare
      }
      if (s0 == end) continue;
      begin_rest[i] = s0;  // the tail (< kBlock) takes the two-step path below
    }
#endif
    for (int64_t s0 = begin_rest[i] > begin ? begin_rest[i] : begin; s0 < end; s0 += kBlock) {
      const int len = static_cast<int>(end - s0 < kBlock ? end - s0 : kBlock);
      if (s0 + kSelectAhead + kBlock <= end)
        prefetch_block(in.models[i], in.model_dtypes[i], s0 + kSelectAhead, kBlock);
      if (has_base) load_block(in.base, in.base_dtype, s0, len, bb);
      const uint32_t mx = c.score(in.models[i], in.model_dtypes[i], s0, has_base ? bb : nullptr,
                                  len, c.l1, bits, tot[i]);
      if (mx >= kNonFinite) {  // rare: count the NaN/Inf scores
        int32_t nb = 0;
        for (int k = 0; k < len; ++k) nb += bits[k] >= kNonFinite ? 1 : 0;
        nonfinite[i] += nb;
      }
      for (int r = 0; r < c.R; ++r) {
        if (c.win[r].model != i) continue;
        ScanAcc acc{};
        c.scan(bits, len, c.win[r], c.l1, room(r, len), &acc);
        add(r, acc);
      }
    }
  }
  // copies of this item against the request's cap: one atomic add per item (per block, the
  // two threads' adds to one cache line cost ~6 ms of a 4096x4096 x 3 pass here)
  for (int r = 0; r < c.R; ++r) {
    if (found[r].cand == nullptr) continue;
    if (c.stored[r].fetch_add(found[r].inside, std::memory_order_relaxed) + found[r].inside >
        c.store_cap[r])
      c.overflow[r].store(true, std::memory_order_relaxed);
  }
  if (c.l1) {
    for (int i = 0; i < in.n; ++i) {
      double t = 0.0;
      for (int l = 0; l < 8; ++l) t += tot[i][l];
      totals[i] += t;
    }
  }
}

uint64_t mix64(uint64_t x) {  // splitmix64 finaliser: the jitter of the sampled runs
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The score bits of model i at the sampled positions (every element when numel <= 65536).
FM_CPU_CLONES
std::vector<uint32_t> sample_scores(const Inputs& in, int i) {
  const int64_t n = in.numel;
  const bool has_base = in.base != nullptr;
  alignas(64) float bb[kBlock];
  std::vector<uint32_t> out;
  auto take = [&](int64_t j0, int len, uint32_t* dst) {  // len <= kBlock scores from j0
    if (has_base) load_block(in.base, in.base_dtype, j0, len, bb);
    score_block_generic(in.models[i], in.model_dtypes[i], j0, has_base ? bb : nullptr, len, false,
                        dst, nullptr);
  };
  if (n <= kMaxSample) {
    out.resize(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; j += kBlock)
      take(j, static_cast<int>(n - j < kBlock ? n - j : kBlock), out.data() + j);
    return out;
  }
  int64_t runs = n / (kRun * 64);
  runs = runs < 128 ? 128 : (runs > kMaxSample / kRun ? kMaxSample / kRun : runs);
  const int64_t stride = n / runs;  // >= 512
  out.resize(static_cast<size_t>(runs * kRun));
  auto start = [&](int64_t r) {
    return r * stride + static_cast<int64_t>(mix64(static_cast<uint64_t>(r)) %
                                             static_cast<uint64_t>(stride - kRun + 1));
  };
  // The runs are scattered, so each costs DRAM misses: ask for the lines of run r + 8 while
  // converting run r (latency-bound otherwise: ~0.4 ms per model for 2048 runs here).
  for (int64_t r = 0; r < runs; ++r) {
    if (r + kPrefetchRuns < runs) {
      const int64_t j = start(r + kPrefetchRuns);
      if (has_base) prefetch_block(in.base, in.base_dtype, j, kRun);
      prefetch_block(in.models[i], in.model_dtypes[i], j, kRun);
    }
    take(start(r), kRun, out.data() + r * kRun);
  }
  return out;
}

// The values of ranks a <= b (0-based, in descending order; 0 <= a, b < size) of the sample
// v, and in `near` the sample values of the bins that hold them: a 2048-bin count of the top
// bits (score bits >> 20: exponent and 3 mantissa bits), then nth_element among the values of
// the bins from rank b's to rank a's only. Two nth_element calls over a 65536-value sample
// took ~0.55 ms per model here (4096x4096 bf16), ~1/6 of the whole pass on 2 threads.
std::pair<uint32_t, uint32_t> sample_ranks(const std::vector<uint32_t>& v, int64_t a, int64_t b,
                                           std::vector<uint32_t>& near) {
  constexpr int kShift = 20;
  std::vector<int64_t> cnt((0xFFFFFFFFu >> kShift) + 1, 0);
  for (uint32_t x : v) ++cnt[x >> kShift];
  int64_t above = 0, above_a = 0;
  int64_t bin_a = -1, bin_b = 0;
  for (int64_t g = static_cast<int64_t>(cnt.size()) - 1; g >= 0; --g) {
    const int64_t c = cnt[static_cast<size_t>(g)];
    if (bin_a < 0 && above + c > a) bin_a = g, above_a = above;
    if (above + c > b) {
      bin_b = g;
      break;
    }
    above += c;
  }
  near.clear();
  for (uint32_t x : v) {
    const int64_t g = x >> kShift;
    if (g >= bin_b && g <= bin_a) near.push_back(x);
  }
  auto desc = std::greater<uint32_t>();
  const auto ia = near.begin() + (a - above_a), ib = near.begin() + (b - above_a);
  std::nth_element(near.begin(), ia, near.end(), desc);
  const uint32_t hi = *ia;
  if (ib != ia) std::nth_element(ia + 1, ib, near.end(), desc);
  return {hi, *ib};
}

// The window of request (k of n) from the model's sample; margin 0 with an exhaustive sample.
Window window_for(int model, int64_t k, int64_t n, const std::vector<uint32_t>& sample,
                  double margin_sd) {
  const int64_t S = static_cast<int64_t>(sample.size());
  int64_t a, b;
  if (S == n) {
    a = b = k - 1;
  } else {
    const double q = static_cast<double>(k) / static_cast<double>(n);
    const double r = q * static_cast<double>(S);
    const double m =
        margin_sd * sqrt(static_cast<double>(S) * q * (1.0 - q)) + (margin_sd > 0.0 ? 32.0 : 0.0);
    a = static_cast<int64_t>(floor(r - m)) - 1;  // ranks 0-based, descending
    b = static_cast<int64_t>(ceil(r + m)) - 1;
  }
  // ranks outside the sample: the window is open on that side
  const bool open_hi = a < 0 || a >= S, open_lo = b < 0 || b >= S;
  const int64_t ra = open_hi ? (open_lo ? 0 : std::min<int64_t>(std::max<int64_t>(a, 0), b)) : a;
  const int64_t rb =
      open_lo ? (open_hi ? 0 : std::max<int64_t>(std::min<int64_t>(b, S - 1), ra)) : b;
  std::vector<uint32_t> near;
  const auto got = sample_ranks(sample, ra, rb, near);
  uint32_t hi = open_hi ? 0xFFFFFFFFu : got.first;
  uint32_t lo = open_lo ? 0u : (b == a ? hi : got.second);
  if (lo > hi) lo = hi;  // a < 0 with b >= S cannot happen; keep the window well formed
  Window w{model, k, lo, hi, 0, {}};
  if (lo == hi) {  // one value: counted, nothing copied
    w.nheavy = 1;
    w.heavy[0] = lo;
    return w;
  }
  // the most frequent values of the sample inside [lo, hi] (>= 1/kHeavyShare of it); with a
  // bound open the values beyond the bins of `near` come from the whole sample
  const int64_t heavy_min = std::max<int64_t>(16, S / kHeavyShare);
  std::vector<uint32_t> in;
  for (uint32_t x : (open_hi || open_lo) ? sample : near)
    if (x >= lo && x <= hi) in.push_back(x);
  std::sort(in.begin(), in.end());
  std::vector<std::pair<int64_t, uint32_t>> runs;  // (count, value)
  for (size_t i = 0; i < in.size();) {
    size_t j = i;
    while (j < in.size() && in[j] == in[i]) ++j;
    if (static_cast<int64_t>(j - i) >= heavy_min)
      runs.emplace_back(static_cast<int64_t>(j - i), in[i]);
    i = j;
  }
  std::sort(runs.begin(), runs.end(), std::greater<std::pair<int64_t, uint32_t>>());
  for (size_t j = 0; j < runs.size() && j < static_cast<size_t>(kHeavy); ++j)
    w.heavy[w.nheavy++] = runs[j].second;
  std::sort(w.heavy, w.heavy + w.nheavy, std::greater<uint32_t>());
  return w;
}

// Per-thread buffers of the selection among the copies (reused: a fresh 128 KiB vector is
// above glibc's mmap threshold, and its page faults cost more than the counting; buffers
// that grew past 4 MiB are released after use, see release_large).
std::vector<int64_t>& tl_counts() {
  static thread_local std::vector<int64_t> v;
  return v;
}
std::vector<uint32_t>& tl_values() {
  static thread_local std::vector<uint32_t> v;
  return v;
}

// cnt[4][nb] += the count of each bin (c[j] - from) >> sh over c[0..m): four interleaved
// tables, since bf16 scores repeat and increments of one bin in a row wait on each other's
// stores. With the branch-free gather, per-thread buffers and the narrowing below, the
// selection among 0.9M copies (4096x4096 x 8, density 0.2, the CI VM's Intel Xeon) took
// 5.0 -> 1.9 ms on 1 thread, 4.0 -> 1.2 ms on 2. Every value lies in
// [from, from + (nb << sh)).
void add_bins(const uint32_t* __restrict c, int64_t m, uint32_t from, int sh, size_t nb,
              int64_t* __restrict cnt) {
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    ++cnt[(c[j] - from) >> sh];
    ++cnt[nb + ((c[j + 1] - from) >> sh)];
    ++cnt[2 * nb + ((c[j + 2] - from) >> sh)];
    ++cnt[3 * nb + ((c[j + 3] - from) >> sh)];
  }
  for (; j < m; ++j) ++cnt[(c[j] - from) >> sh];
}

void release_large() {
  constexpr size_t kKeep = size_t{4} << 20;
  if (tl_values().capacity() * sizeof(uint32_t) > kKeep) std::vector<uint32_t>().swap(tl_values());
  if (tl_counts().capacity() * sizeof(int64_t) > kKeep) std::vector<int64_t>().swap(tl_counts());
}

// After add_bins over everything in [from, from + (nb << sh)): folds the four tables, adds
// the frequent values of the window that fall in the range, and returns the bin holding the
// rank-th largest (rank becomes the rank inside it). consistent turns false if the counts do
// not add up (a miss: the caller leaves the request to the radix selection).
size_t bin_of_rank(int64_t* cnt, size_t nb, const Window& w, const int64_t* heavy, uint32_t from,
                   int sh, int64_t& rank, bool& consistent) {
  for (size_t b = 0; b < nb; ++b) cnt[b] += cnt[nb + b] + cnt[2 * nb + b] + cnt[3 * nb + b];
  for (int j = 0; j < w.nheavy; ++j) {
    const uint32_t d = w.heavy[j] - from;
    if (w.heavy[j] >= from && (d >> sh) < nb) cnt[d >> sh] += heavy[j];
  }
  size_t h = nb - 1;
  while (h > 0 && rank > cnt[h]) rank -= cnt[h--];
  consistent = consistent && rank <= cnt[h];
  return h;
}

}  // namespace

void topk_window(const Inputs& in, const int64_t* req_model, const int64_t* req_k, int R, bool l1,
                 int64_t* thr_bits, double* kept_l1, double* total_l1, int64_t* nonfinite,
                 int nthreads, double margin_sd, int isa) {
  const int64_t n = in.numel;
  for (int r = 0; r < R; ++r) {
    thr_bits[r] = -1;
    kept_l1[r] = 0.0;
  }
  if (n == 0 || R == 0) return;

  // 1. windows from the samples (one sample per model)
  std::vector<Window> win(static_cast<size_t>(R));
  std::vector<std::vector<uint32_t>> samples(static_cast<size_t>(in.n));
  std::vector<int64_t> store_cap(static_cast<size_t>(R), n / 4 + 4096);
  std::vector<int> sampled;
  for (int r = 0; r < R; ++r) {
    const int i = static_cast<int>(req_model[r]);
    if (std::find(sampled.begin(), sampled.end(), i) == sampled.end()) sampled.push_back(i);
  }
  const int nt = effective_threads(n, nthreads, int64_t{1} << 15);
  const int nsampled = static_cast<int>(sampled.size());
#pragma omp parallel for num_threads(nt < nsampled ? nt : nsampled) schedule(dynamic, 1)
  for (int q = 0; q < nsampled; ++q) {  // per model: its sample, then its requests' windows
    const int i = sampled[static_cast<size_t>(q)];
    samples[static_cast<size_t>(i)] = sample_scores(in, i);
    for (int r = 0; r < R; ++r)
      if (req_model[r] == i)
        win[static_cast<size_t>(r)] =
            window_for(i, req_k[r], n, samples[static_cast<size_t>(i)], margin_sd);
  }

  // 2. the pass, in dynamic work items of kChunk elements
  const int64_t items = (n + kChunk - 1) / kChunk;
  std::vector<Found> found(static_cast<size_t>(items * R));
  std::vector<double> totals(static_cast<size_t>(items * in.n), 0.0);
  std::vector<int64_t> bad(static_cast<size_t>(items * in.n), 0);
  std::vector<std::atomic<int64_t>> stored(static_cast<size_t>(R));
  std::vector<std::atomic<bool>> overflow(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    stored[static_cast<size_t>(r)] = 0;
    overflow[static_cast<size_t>(r)] = false;
  }
  static const ScanFn best = pick_scan(2);
  static const ScoreFn best_score = pick_score(2);
  PassCtx c{&in,
            win.data(),
            R,
            l1,
            isa >= 2 ? best : pick_scan(isa),
            isa >= 2 ? best_score : pick_score(isa),
            stored.data(),
            store_cap.data(),
            overflow.data(),
            isa >= 2 && best_score != score_block_generic};
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t q = 0; q < items; ++q) {
    const int64_t begin = q * kChunk;
    const int64_t end = n - begin > kChunk ? begin + kChunk : n;
    window_range(c, begin, end, found.data() + q * R, totals.data() + q * in.n,
                 bad.data() + q * in.n);
  }
  for (int i = 0; i < in.n; ++i) {
    double t = 0.0;
    int64_t b = 0;
    for (int64_t q = 0; q < items; ++q) {
      t += totals[static_cast<size_t>(q * in.n + i)];
      b += bad[static_cast<size_t>(q * in.n + i)];
    }
    total_l1[i] += t;
    nonfinite[i] += b;
  }

  // 3. per request: the exact k-th largest among the copied scores, and the kept L1
  // (threads only when there is much to look at: waking a pool costs more than a few scores)
  int64_t copied = 0;
  for (int r = 0; r < R; ++r) copied += stored[static_cast<size_t>(r)].load();
#pragma omp parallel for num_threads(nt < R ? nt : R) schedule(dynamic, 1) if (copied > 1 << 17)
  for (int r = 0; r < R; ++r) {
    const Window& w = win[static_cast<size_t>(r)];
    int64_t above = 0, inside = 0;
    for (int64_t q = 0; q < items; ++q) {
      above += found[static_cast<size_t>(q * R + r)].above;
      inside += found[static_cast<size_t>(q * R + r)].inside;
    }
    int64_t heavy[kHeavy] = {};
    for (int64_t q = 0; q < items; ++q)
      for (int j = 0; j < w.nheavy; ++j) heavy[j] += found[static_cast<size_t>(q * R + r)].heavy[j];
    int64_t in_all = inside;
    for (int j = 0; j < w.nheavy; ++j) in_all += heavy[j];
    if (!(above < w.k && w.k <= above + in_all)) continue;  // the window missed
    if (inside > 0 && overflow[static_cast<size_t>(r)].load()) continue;
    // The window's values in up to kSelectBins bins of (score - lo) >> shift: one counting
    // pass over the copies (plus the frequent values' counts) finds the bin holding the
    // rank-th largest; the copies in that bin are gathered and narrowed the same way, 12 bits
    // at a time, down to one value.
    const uint32_t width = w.hi - w.lo;
    int shift = 0;
    while ((width >> shift) >= kSelectBins) ++shift;
    std::vector<int64_t>& cnt = tl_counts();
    size_t nb = static_cast<size_t>(width >> shift) + 1;
    cnt.assign(4 * nb, 0);
    for (int64_t q = 0; q < items && inside > 0; ++q) {
      const Found& f = found[static_cast<size_t>(q * R + r)];
      add_bins(f.cand, f.inside, w.lo, shift, nb, cnt.data());
    }
    int64_t rank = w.k - above;  // 1-based rank among the scores in the window
    bool consistent = true;
    const size_t g = bin_of_rank(cnt.data(), nb, w, heavy, w.lo, shift, rank, consistent);
    int64_t copies_g = cnt[g];  // the copies in bin g
    for (int j = 0; j < w.nheavy; ++j)
      if (((w.heavy[j] - w.lo) >> shift) == g) copies_g -= heavy[j];
    // gathered without a branch (a data-dependent one mispredicts); one value of room
    std::vector<uint32_t>& vals = tl_values();
    vals.resize(static_cast<size_t>(copies_g) + 1);
    size_t nv = 0;
    for (int64_t q = 0; q < items && inside > 0; ++q) {
      const Found& f = found[static_cast<size_t>(q * R + r)];
      for (int64_t j = 0; j < f.inside; ++j) {
        const uint32_t v = f.cand[j];
        vals[nv] = v;
        nv += ((v - w.lo) >> shift) == g ? 1 : 0;
      }
    }
    uint32_t from = w.lo + (static_cast<uint32_t>(g) << shift);
    for (int sh = shift; sh > 0;) {  // narrow [from, from + 2^sh) to one value
      const int nsh = sh > 12 ? sh - 12 : 0;
      nb = static_cast<size_t>(((uint64_t{1} << sh) - 1) >> nsh) + 1;
      cnt.assign(4 * nb, 0);
      add_bins(vals.data(), static_cast<int64_t>(nv), from, nsh, nb, cnt.data());
      const size_t h = bin_of_rank(cnt.data(), nb, w, heavy, from, nsh, rank, consistent);
      size_t kept = 0;
      for (size_t j = 0; j < nv; ++j) {
        const uint32_t v = vals[j];
        vals[kept] = v;
        kept += ((v - from) >> nsh) == h ? 1 : 0;
      }
      nv = kept;
      from += static_cast<uint32_t>(h) << nsh;
      sh = nsh;
    }
    release_large();
    if (!consistent) continue;
    const uint32_t t = from;
    thr_bits[r] = t;
    if (l1) {
      double s = 0.0;
      for (int64_t q = 0; q < items; ++q) {
        const Found& f = found[static_cast<size_t>(q * R + r)];
        s += f.above_l1;
        for (int j = 0; j < w.nheavy; ++j)
          if (w.heavy[j] >= t) s += static_cast<double>(f.heavy[j]) * fm_u2f(w.heavy[j]);
        double cs = 0.0;
        for (int64_t j = 0; j < f.inside; ++j)
          cs += f.cand[j] >= t ? static_cast<double>(fm_u2f(f.cand[j])) : 0.0;
        s += cs;
      }
      kept_l1[r] = s;
    }
  }
  for (Found& f : found) free(f.cand);
}

}  // namespace cpu
}  // namespace fastmerge
