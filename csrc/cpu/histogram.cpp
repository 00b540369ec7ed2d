// fastmerge CPU backend: radix digit histograms of the selection score (score_histogram).
//
// One pass over the chunk serves every target row: each block of base + models is converted
// once, then each row's score bits are binned into that thread's private table (no atomics);
// the tables are merged into the caller's int64 counts / float64 sums at the end.
//
// Level 0 with the magnitude score, the hot path of every top-k, keeps ONE packed uint64 per
// bin: (count << 40) + sum of the low 16 score bits. Every element of a level-0 bin shares its
// top 16 bits (sign, exponent, 7 mantissa bits), so the exact sum of |t| over the bin is
// 2^(e-150) * (count * (2^23 + mantissa_hi << 16) + sum_low), rebuilt in float64 at the flush:
// one read-modify-write per element instead of two, and the sums come out exact. Each thread
// flushes at least every kSegment elements so neither field overflows.
// Level 1 with the magnitude score bins exact values, so its sums are count * value (exact).
// The Fisher score (t*t*v) bins a different quantity than |t|, so it sums |t| in float64.
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include <vector>

#include "fm_cpu_block.h"

namespace fastmerge {
namespace cpu {
namespace {

constexpr uint64_t kCountUnit = 1ull << 40;
constexpr uint64_t kLowMask = kCountUnit - 1;
constexpr int64_t kSegment = (int64_t{1} << 24) - kBlock;  // < 2^24 counts, < 2^40 low sums

struct HistCtx {
  const Inputs* in;
  int score;
  const int64_t* targets;
  int n_targets;
  int level;
  bool packed;         // level 0, magnitude score
  const int* widths;   // level 1: row r bins the prefixes [prefix, prefix + widths[r]) (null: 1)
  const size_t* offs;  // the first bin of row r in the tables and outputs
  int width(int r) const { return widths != nullptr ? widths[r] : 1; }
};

// Sum of |t| over a level-0 magnitude bin from its count and the sum of its low 16 bits.
double packed_bin_sum(uint32_t bin, uint64_t count, uint64_t low_sum) {
  const uint32_t e = bin >> 7, hi7 = bin & 0x7Fu;
  if (e == 0xFFu) return (hi7 == 0 && low_sum == 0) ? INFINITY : NAN;
  const uint64_t mant = count * ((e ? (1ull << 23) : 0ull) | (uint64_t{hi7} << 16)) + low_sum;
  return ldexp(static_cast<double>(mant), static_cast<int>(e ? e : 1) - 150);
}

// Level-0 packed updates of G rows (a compile-time group): element by element, the G
// read-modify-writes go to G different tables, so a run of equal bins in one model (bf16
// task vectors take few distinct values) does not serialise on store-to-load forwarding.
// Measured here (AMD EPYC, 1 thread, 4096x4096 bf16, N = 3): the runtime-bound row loop took
// 1.3 ns per element and model, this unrolled form ~0.7.
template <int G>
FM_FORCE_INLINE void packed_scatter(uint64_t* __restrict table, const uint32_t* __restrict bits,
                                    int len) {
  for (int k = 0; k < len; ++k) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const uint32_t x = bits[static_cast<size_t>(g) * kBlock + k];
      table[static_cast<size_t>(g) * NUM_BINS + (x >> RADIX_BITS)] +=
          kCountUnit | (x & (NUM_BINS - 1));
    }
  }
}

// Level 1: only elements whose top bits equal the prefix are binned (a few percent). A
// vectorised compare writes one byte per element, and the bytes are scanned eight at a time,
// so the branch is taken per 8-element word instead of mispredicted per element. Measured
// here (1 thread, 4096x4096 bf16, N = 3, 1.5% of elements in the bin): 0.50 ns per element and
// model with a per-element branch, ~0.2 this way.
// A row of width W bins the W prefixes from `prefix` on into W consecutive tables (one unsigned
// compare), its table index (top - prefix) << 16 | low.
template <bool FISHER>
FM_FORCE_INLINE void level1_scatter(const uint32_t* __restrict bits, const float* __restrict tt,
                                    int len, uint32_t prefix, uint32_t width,
                                    uint64_t* __restrict tab, double* __restrict sm,
                                    uint32_t* range) {
  alignas(64) uint8_t hit[kBlock + 8];
  for (int k = 0; k < len; ++k) hit[k] = (bits[k] >> RADIX_BITS) - prefix < width ? 1 : 0;
  for (int k = len; k < ((len + 7) & ~7); ++k) hit[k] = 0;
  for (int g = 0; g < len; g += 8) {
    uint64_t word;
    memcpy(&word, hit + g, sizeof(word));
    while (word != 0) {
      const int k = g + (__builtin_ctzll(word) >> 3);
      word &= word - 1;
      const uint32_t b = bits[k] - (prefix << RADIX_BITS);
      tab[b] += 1;
      if (FISHER) sm[b] += static_cast<double>(fm_abs(tt[k]));
      uint32_t* rg = range + 2 * (b >> RADIX_BITS);  // each prefix's touched low digits
      const uint32_t low = b & (NUM_BINS - 1);
      rg[0] = low < rg[0] ? low : rg[0];
      rg[1] = low > rg[1] ? low : rg[1];
    }
  }
}

// Widens [range[0], range[1]] to the level-0 bins of a block of score bits (vector min / max).
FM_FORCE_INLINE void widen_range(const uint32_t* __restrict bits, int len, uint32_t* range) {
  uint32_t lo = 0xFFFFFFFFu, hi = 0;
  for (int k = 0; k < len; ++k) {
    lo = bits[k] < lo ? bits[k] : lo;
    hi = bits[k] > hi ? bits[k] : hi;
  }
  lo >>= RADIX_BITS;
  hi >>= RADIX_BITS;
  range[0] = lo < range[0] ? lo : range[0];
  range[1] = hi > range[1] ? hi : range[1];
}

FM_CPU_CLONES
void hist_range(const HistCtx& c, int64_t begin, int64_t end, uint64_t* table, double* sums,
                uint32_t* bits_all, uint32_t* ranges) {
  const Inputs& in = *c.in;
  alignas(64) float bb[kBlock];
  alignas(64) float tt[kBlock];
  alignas(64) float vv[kBlock];
  const bool fisher = c.score == SCORE_FISHER;
  const bool has_base = in.base != nullptr;
  const int T = c.n_targets;
  for (int64_t s = begin; s < end; s += kBlock) {
    const int len = static_cast<int>(end - s < kBlock ? end - s : kBlock);
    if (has_base) load_block(in.base, in.base_dtype, s, len, bb);
    int loaded = -1;  // the model whose block tt / the previous row's bits hold
    for (int r = 0; r < T; ++r) {
      const int i = static_cast<int>(c.targets[2 * r]);
      const uint32_t prefix = static_cast<uint32_t>(c.targets[2 * r + 1]);
      uint64_t* __restrict tab = table + c.offs[r];
      uint32_t* __restrict bits = bits_all + static_cast<size_t>(r) * kBlock;
      double* __restrict sm = fisher ? sums + c.offs[r] : nullptr;
      const uint32_t width = static_cast<uint32_t>(c.width(r));
      uint32_t* range = ranges + 2 * (c.offs[r] / NUM_BINS);
      if (i == loaded) {  // another prefix of the same model (breadcrumbs' two thresholds)
        memcpy(bits, bits - kBlock, sizeof(uint32_t) * static_cast<size_t>(len));
      } else {
        load_task_block(in.models[i], in.model_dtypes[i], s, len, bb, has_base, tt);
        if (fisher) {
          load_block(in.moments[i], in.moment_dtypes[i], s, len, vv);
          for (int k = 0; k < len; ++k) bits[k] = fm_score_bits(tt[k], vv[k], SCORE_FISHER);
        } else {
          for (int k = 0; k < len; ++k) bits[k] = fm_score_bits(tt[k], 0.0f, SCORE_MAGNITUDE);
        }
        loaded = i;
      }
      if (fisher) {
        if (c.level == 0) {
          widen_range(bits, len, range);
          for (int k = 0; k < len; ++k) {
            const uint32_t b = bits[k] >> RADIX_BITS;
            tab[b] += 1;
            sm[b] += static_cast<double>(fm_abs(tt[k]));
          }
        } else {
          level1_scatter<true>(bits, tt, len, prefix, width, tab, sm, range);
        }
      } else {
        if (c.level != 0) {
          level1_scatter<false>(bits, tt, len, prefix, width, tab, nullptr, range);
        } else {
          widen_range(bits, len, range);
        }
      }
    }
    if (c.packed) {
      for (int r0 = 0; r0 < T; r0 += 4) {
        uint64_t* tab = table + static_cast<size_t>(r0) * NUM_BINS;
        const uint32_t* bits = bits_all + static_cast<size_t>(r0) * kBlock;
        switch (T - r0 < 4 ? T - r0 : 4) {
          case 1: packed_scatter<1>(tab, bits, len); break;
          case 2: packed_scatter<2>(tab, bits, len); break;
          case 3: packed_scatter<3>(tab, bits, len); break;
          default: packed_scatter<4>(tab, bits, len); break;
        }
      }
    }
  }
}

// Adds bins [lo, hi] of one table (its digits under `prefix` at level 1) to the outputs.
void flush_bins(const HistCtx& c, uint64_t* tab, double* sm, int64_t* co, double* so,
                uint32_t prefix, uint32_t lo, uint32_t hi) {
  for (uint32_t b = lo; b <= hi; ++b) {
    const uint64_t x = tab[b];
    if (x == 0) continue;
    if (c.packed) {
      const uint64_t cnt = x >> 40;
      co[b] += static_cast<int64_t>(cnt);
      so[b] += packed_bin_sum(b, cnt, x & kLowMask);
    } else {
      co[b] += static_cast<int64_t>(x);
      if (sm != nullptr) {
        so[b] += sm[b];
      } else {  // level 1, magnitude: every element of the bin has the same value
        so[b] += static_cast<double>(x) * static_cast<double>(fm_u2f((prefix << RADIX_BITS) | b));
      }
    }
  }
  memset(tab + lo, 0, sizeof(uint64_t) * (hi - lo + 1));
  if (sm != nullptr) memset(sm + lo, 0, sizeof(double) * (hi - lo + 1));
}

// Adds one thread's tables into the outputs and clears them (called under a critical section).
// Only each row's touched bins [ranges[2r], ranges[2r+1]] are visited (a few thousand of the
// 65536 for real task vectors; per prefix of a row of several), and the ranges are reset.
void flush(const HistCtx& c, uint64_t* table, double* sums, int64_t* counts_out, double* sums_out,
           uint32_t* ranges) {
  for (int q = 0; q < c.n_targets; ++q) {
    for (int sub = 0; sub < c.width(q); ++sub) {
      const size_t off = c.offs[q] + static_cast<size_t>(sub) * NUM_BINS;
      uint32_t* rg = ranges + 2 * (off / NUM_BINS);
      const uint32_t lo = rg[0], hi = rg[1];
      rg[0] = 0xFFFFFFFFu;
      rg[1] = 0;
      if (lo > hi) continue;  // nothing binned since the last flush
      flush_bins(c, table + off, sums != nullptr ? sums + off : nullptr, counts_out + off,
                 sums_out + off, static_cast<uint32_t>(c.targets[2 * q + 1]) + sub, lo, hi);
    }
  }
}

// One worker thread's histogram tables, kept between calls and all zero between them (flush
// clears what it visits): allocating and zeroing 512 KiB per target on every call cost more
// than binning a 1M-element tensor (page faults; measured ~0.3 ns per element and model).
struct ThreadTables {
  uint64_t* table = nullptr;
  double* sums = nullptr;
  size_t cap = 0;  // bins held by each of table / sums
  uint32_t* bits = nullptr;
  uint32_t* ranges = nullptr;
  int cap_targets = 0;
  ~ThreadTables() { release(); }
  void release() {
    free(table);
    free(sums);
    free(bits);
    free(ranges);
    table = nullptr;
    sums = nullptr;
    bits = nullptr;
    ranges = nullptr;
    cap = 0;
    cap_targets = 0;
  }
  // zeroed tables of `bins` bins for n_targets rows (sums too when with_sums); false if out of
  // memory
  bool reserve(size_t bins, int n_targets, bool with_sums) {
    if (bins > cap || n_targets > cap_targets || (with_sums && sums == nullptr)) {
      const bool had_sums = sums != nullptr || with_sums;
      release();
      table = static_cast<uint64_t*>(calloc(bins, sizeof(uint64_t)));
      sums = had_sums ? static_cast<double*>(calloc(bins, sizeof(double))) : nullptr;
      bits = static_cast<uint32_t*>(malloc(sizeof(uint32_t) * kBlock * n_targets));
      ranges = static_cast<uint32_t*>(malloc(sizeof(uint32_t) * 2 * (bins / NUM_BINS)));
      if (table == nullptr || (had_sums && sums == nullptr) || bits == nullptr ||
          ranges == nullptr) {
        release();
        return false;
      }
      cap = bins;
      cap_targets = n_targets;
      for (size_t r = 0; r < bins / NUM_BINS; ++r) {
        ranges[2 * r] = 0xFFFFFFFFu;
        ranges[2 * r + 1] = 0;
      }
    }
    return true;
  }
};

thread_local ThreadTables tls_tables;

}  // namespace

namespace {

bool histogram_rows(const Inputs& in, int score, const int64_t* targets, const int* widths,
                    int n_targets, int level, int64_t* counts, double* sums, int nthreads) {
  if (in.numel == 0 || n_targets == 0) return true;
  std::vector<size_t> offs(static_cast<size_t>(n_targets));
  size_t bins = 0;
  for (int r = 0; r < n_targets; ++r) {
    offs[static_cast<size_t>(r)] = bins;
    bins += static_cast<size_t>(widths != nullptr ? widths[r] : 1) * NUM_BINS;
  }
  HistCtx c{&in,    score,      targets, n_targets, level, level == 0 && score == SCORE_MAGNITUDE,
            widths, offs.data()};
  const bool fisher = score == SCORE_FISHER;
  int nt = effective_threads(in.numel, nthreads < 64 ? nthreads : 64, int64_t{1} << 17);
  bool failed[64] = {};
  // dynamic work items of kHistChunk elements (a preempted thread does not stall the others);
  // the packed tables are flushed before a thread's elements since the last flush could
  // exceed kSegment
  constexpr int64_t kHistChunk = kChunk * 2;
  const int64_t chunks = (in.numel + kHistChunk - 1) / kHistChunk;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    ThreadTables& tt = tls_tables;
    const bool ok = tt.reserve(bins, n_targets, fisher);
    if (!ok) failed[tid] = true;
    int64_t since_flush = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < chunks; ++q) {
      if (!ok) continue;
      const int64_t begin = q * kHistChunk;
      const int64_t end = in.numel - begin > kHistChunk ? begin + kHistChunk : in.numel;
      if (c.packed && since_flush + (end - begin) > kSegment) {
#pragma omp critical(fastmerge_hist_flush)
        flush(c, tt.table, fisher ? tt.sums : nullptr, counts, sums, tt.ranges);
        since_flush = 0;
      }
      hist_range(c, begin, end, tt.table, tt.sums, tt.bits, tt.ranges);
      since_flush += end - begin;
    }
    if (ok) {
#pragma omp critical(fastmerge_hist_flush)
      flush(c, tt.table, fisher ? tt.sums : nullptr, counts, sums, tt.ranges);
    }
  }
  bool any_failed = false;
  for (int t = 0; t < 64; ++t) any_failed = any_failed || failed[t];
  return !any_failed;
}

}  // namespace

bool score_histogram(const Inputs& in, int score, const int64_t* targets, int n_targets, int level,
                     int64_t* counts, double* sums, int nthreads) {
  return histogram_rows(in, score, targets, nullptr, n_targets, level, counts, sums, nthreads);
}

bool score_histogram_windows(const Inputs& in, const int64_t* targets, const int* widths,
                             int n_targets, int64_t* counts, double* sums, int nthreads) {
  return histogram_rows(in, SCORE_MAGNITUDE, targets, widths, n_targets, 1, counts, sums, nthreads);
}

}  // namespace cpu
}  // namespace fastmerge
