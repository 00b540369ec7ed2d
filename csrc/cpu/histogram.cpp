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
  bool packed;  // level 0, magnitude score
};

// Sum of |t| over a level-0 magnitude bin from its count and the sum of its low 16 bits.
double packed_bin_sum(uint32_t bin, uint64_t count, uint64_t low_sum) {
  const uint32_t e = bin >> 7, hi7 = bin & 0x7Fu;
  if (e == 0xFFu) return (hi7 == 0 && low_sum == 0) ? INFINITY : NAN;
  const uint64_t mant = count * ((e ? (1ull << 23) : 0ull) | (uint64_t{hi7} << 16)) + low_sum;
  return ldexp(static_cast<double>(mant), static_cast<int>(e ? e : 1) - 150);
}

FM_CPU_CLONES
void hist_range(const HistCtx& c, int64_t begin, int64_t end, uint64_t* table, double* sums,
                uint32_t* bits_all) {
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
    for (int r = 0; r < T; ++r) {
      const int i = static_cast<int>(c.targets[2 * r]);
      const uint32_t prefix = static_cast<uint32_t>(c.targets[2 * r + 1]);
      uint64_t* __restrict tab = table + static_cast<size_t>(r) * NUM_BINS;
      uint32_t* __restrict bits = bits_all + static_cast<size_t>(r) * kBlock;
      load_task_block(in.models[i], in.model_dtypes[i], s, len, bb, has_base, tt);
      if (fisher) {
        double* __restrict sm = sums + static_cast<size_t>(r) * NUM_BINS;
        load_block(in.moments[i], in.moment_dtypes[i], s, len, vv);
        for (int k = 0; k < len; ++k) bits[k] = fm_score_bits(tt[k], vv[k], SCORE_FISHER);
        if (c.level == 0) {
          for (int k = 0; k < len; ++k) {
            const uint32_t b = bits[k] >> RADIX_BITS;
            tab[b] += 1;
            sm[b] += static_cast<double>(fm_abs(tt[k]));
          }
        } else {
          for (int k = 0; k < len; ++k) {
            if ((bits[k] >> RADIX_BITS) == prefix) {
              const uint32_t b = bits[k] & (NUM_BINS - 1);
              tab[b] += 1;
              sm[b] += static_cast<double>(fm_abs(tt[k]));
            }
          }
        }
      } else {
        for (int k = 0; k < len; ++k) bits[k] = fm_score_bits(tt[k], 0.0f, SCORE_MAGNITUDE);
        if (c.level != 0) {
          for (int k = 0; k < len; ++k)
            if ((bits[k] >> RADIX_BITS) == prefix) tab[bits[k] & (NUM_BINS - 1)] += 1;
        }
      }
    }
    if (c.packed) {
      // interleave the rows' updates element by element: consecutive read-modify-writes go to
      // different tables, so repeated bins of one model do not stall on each other
      for (int k = 0; k < len; ++k) {
        for (int r = 0; r < T; ++r) {
          const uint32_t x = bits_all[static_cast<size_t>(r) * kBlock + k];
          table[static_cast<size_t>(r) * NUM_BINS + (x >> RADIX_BITS)] +=
              kCountUnit | (x & (NUM_BINS - 1));
        }
      }
    }
  }
}

// Adds one thread's tables into the outputs and clears them (called under a critical section).
void flush(const HistCtx& c, uint64_t* table, double* sums, int64_t* counts_out,
           double* sums_out) {
  for (int r = 0; r < c.n_targets; ++r) {
    uint64_t* tab = table + static_cast<size_t>(r) * NUM_BINS;
    int64_t* co = counts_out + static_cast<size_t>(r) * NUM_BINS;
    double* so = sums_out + static_cast<size_t>(r) * NUM_BINS;
    const uint32_t prefix = static_cast<uint32_t>(c.targets[2 * r + 1]);
    for (uint32_t b = 0; b < static_cast<uint32_t>(NUM_BINS); ++b) {
      const uint64_t x = tab[b];
      if (x == 0) continue;
      if (c.packed) {
        const uint64_t cnt = x >> 40;
        co[b] += static_cast<int64_t>(cnt);
        so[b] += packed_bin_sum(b, cnt, x & kLowMask);
      } else {
        co[b] += static_cast<int64_t>(x);
        if (sums != nullptr) {
          so[b] += sums[static_cast<size_t>(r) * NUM_BINS + b];
        } else {  // level 1, magnitude: every element of the bin has the same value
          so[b] += static_cast<double>(x) *
                   static_cast<double>(fm_u2f((prefix << RADIX_BITS) | b));
        }
      }
    }
    memset(tab, 0, sizeof(uint64_t) * NUM_BINS);
    if (sums != nullptr) memset(sums + static_cast<size_t>(r) * NUM_BINS, 0,
                                sizeof(double) * NUM_BINS);
  }
}

}  // namespace

bool score_histogram(const Inputs& in, int score, const int64_t* targets, int n_targets,
                     int level, int64_t* counts, double* sums, int nthreads) {
  if (in.numel == 0 || n_targets == 0) return true;
  HistCtx c{&in, score, targets, n_targets, level, level == 0 && score == SCORE_MAGNITUDE};
  const bool fisher = score == SCORE_FISHER;
  // per-thread tables: 512 KiB per target (1 MiB with Fisher sums); keep them under 1 GiB
  const size_t per_thread = static_cast<size_t>(n_targets) * NUM_BINS;
  const size_t bytes_per_thread = per_thread * (fisher ? 16 : 8);
  int nt = effective_threads(in.numel, nthreads < 64 ? nthreads : 64, int64_t{1} << 17);
  bool failed[64] = {};
  while (nt > 1 && static_cast<size_t>(nt) * bytes_per_thread > (size_t{1} << 30)) --nt;
  uint64_t* tables = static_cast<uint64_t*>(calloc(per_thread * nt, sizeof(uint64_t)));
  double* tsums = fisher ? static_cast<double*>(calloc(per_thread * nt, sizeof(double)))
                         : nullptr;
  if (tables == nullptr || (fisher && tsums == nullptr)) {
    free(tables);
    free(tsums);
    nt = 1;
    tables = static_cast<uint64_t*>(calloc(per_thread, sizeof(uint64_t)));
    tsums = fisher ? static_cast<double*>(calloc(per_thread, sizeof(double))) : nullptr;
  }
  if (tables == nullptr || (fisher && tsums == nullptr)) {
    free(tables);
    free(tsums);
    return false;
  }
  // dynamic work items of kHistChunk elements (a preempted thread does not stall the others);
  // the packed tables are flushed before a thread's elements since the last flush could
  // exceed kSegment
  constexpr int64_t kHistChunk = kChunk * 16;
  const int64_t chunks = (in.numel + kHistChunk - 1) / kHistChunk;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    uint64_t* table = tables + per_thread * tid;
    double* tsum = fisher ? tsums + per_thread * tid : nullptr;
    uint32_t* bits = static_cast<uint32_t*>(malloc(sizeof(uint32_t) * kBlock * n_targets));
    if (bits == nullptr) failed[tid] = true;
    int64_t since_flush = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < chunks; ++q) {
      if (bits == nullptr) continue;
      const int64_t begin = q * kHistChunk;
      const int64_t end = in.numel - begin > kHistChunk ? begin + kHistChunk : in.numel;
      if (c.packed && since_flush + (end - begin) > kSegment) {
#pragma omp critical(fastmerge_hist_flush)
        flush(c, table, tsum, counts, sums);
        since_flush = 0;
      }
      hist_range(c, begin, end, table, tsum, bits);
      since_flush += end - begin;
    }
#pragma omp critical(fastmerge_hist_flush)
    flush(c, table, tsum, counts, sums);
    free(bits);
  }
  free(tables);
  free(tsums);
  bool any_failed = false;
  for (int t = 0; t < 64; ++t) any_failed = any_failed || failed[t];
  return !any_failed;
}

}  // namespace cpu
}  // namespace fastmerge
