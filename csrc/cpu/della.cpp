// fastmerge CPU backend: della and della_linear in one pass over a chunk of whole rows
// (fastmerge/methods/della.py is the semantics and the float32 reference).
//
// Per row and model: the task values d = x - b in float32, their exact ranks by |d| with ties
// by column (the float bits of |d| radix-sorted, stable), the keep thresholds floor(p * 2^32)
// with p in float64 as keep_thresholds computes it, the semantics-v2 Philox words, the keep
// mask. The reduce pass adds the L1 sums |d| and |kept d| (float64, rows in order, a fixed
// lane order within a row, so the bits do not depend on the chunking or the thread count) and
// may keep the mask bits, so the apply pass does not rank again. The apply pass mirrors the
// reference's float32 operations one by one (same roundings; sums over models in model order).
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "fastmerge_rng.h"
#include "fm_cpu.h"
#include "fm_cpu_block.h"

namespace fastmerge {
namespace cpu {
namespace {

constexpr int kDigitBits = 11;  // 3 passes over the 31 bits of |d|, 2048 counters each
constexpr int kBuckets = 1 << kDigitBits;
constexpr int64_t kSmallRow = 256;  // rows up to this length sort with std::sort
constexpr double kTwo32 = 4294967296.0;

// Work buffers of one thread, sized for one row (malloc: no exception leaves an omp region).
struct RowBuffers {
  float* base = nullptr;       // [len] float32 base row
  float* out = nullptr;        // [len] float32 merged row
  float* d = nullptr;          // [n][len] task values
  uint8_t* keep = nullptr;     // [n][len] keep mask
  uint32_t* words = nullptr;   // [len] Philox words
  uint32_t* rank = nullptr;    // [len] rank by |d|
  uint64_t* items = nullptr;   // [len] (|d| bits << 32 | column), sorted
  uint64_t* tmp = nullptr;     // [len] the radix sort's other buffer
  uint32_t* counts = nullptr;  // [3][kBuckets]

  bool alloc(int64_t len, int n) {
    const size_t l = static_cast<size_t>(len), m = static_cast<size_t>(n);
    base = static_cast<float*>(malloc(sizeof(float) * l));
    out = static_cast<float*>(malloc(sizeof(float) * l));
    d = static_cast<float*>(malloc(sizeof(float) * l * (m ? m : 1)));
    keep = static_cast<uint8_t*>(malloc(l * (m ? m : 1)));
    words = static_cast<uint32_t*>(malloc(sizeof(uint32_t) * l));
    rank = static_cast<uint32_t*>(malloc(sizeof(uint32_t) * l));
    items = static_cast<uint64_t*>(malloc(sizeof(uint64_t) * l));
    tmp = static_cast<uint64_t*>(malloc(sizeof(uint64_t) * l));
    counts = static_cast<uint32_t*>(malloc(sizeof(uint32_t) * 3 * kBuckets));
    return base && out && d && keep && words && rank && items && tmp && counts;
  }
  ~RowBuffers() {
    free(base);
    free(out);
    free(d);
    free(keep);
    free(words);
    free(rank);
    free(items);
    free(tmp);
    free(counts);
  }
};

inline uint32_t abs_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u & 0x7FFFFFFFu;  // |x|: its bits order like its value (NaN above Inf)
}

// rank[k] = the 0-based position of column k among the row's |d| ascending, ties by column.
void rank_row(const float* d, int64_t len, RowBuffers& b) {
  if (len > int64_t{0xFFFFFFFF}) {  // columns no longer fit the packed items: a plain stable sort
    uint64_t* idx = b.items;
    for (int64_t k = 0; k < len; ++k) idx[k] = static_cast<uint64_t>(k);
    std::stable_sort(idx, idx + len,
                     [d](uint64_t x, uint64_t y) { return abs_bits(d[x]) < abs_bits(d[y]); });
    for (int64_t k = 0; k < len; ++k) b.rank[idx[k]] = static_cast<uint32_t>(k);
    return;
  }
  uint64_t* it = b.items;
  for (int64_t k = 0; k < len; ++k)
    it[k] = (static_cast<uint64_t>(abs_bits(d[k])) << 32) | static_cast<uint64_t>(k);
  if (len <= kSmallRow) {
    std::sort(it, it + len);  // (bits, column) pairs are distinct: the order is the stable one
  } else {
    uint32_t* c = b.counts;
    memset(c, 0, sizeof(uint32_t) * 3 * kBuckets);
    for (int64_t k = 0; k < len; ++k) {
      const uint32_t key = static_cast<uint32_t>(it[k] >> 32);
      ++c[key & (kBuckets - 1)];
      ++c[kBuckets + ((key >> kDigitBits) & (kBuckets - 1))];
      ++c[2 * kBuckets + (key >> (2 * kDigitBits))];
    }
    uint64_t* src = it;
    uint64_t* dst = b.tmp;
    for (int pass = 0; pass < 3; ++pass) {
      uint32_t* h = c + pass * kBuckets;
      const int shift = 32 + pass * kDigitBits;
      if (h[(src[0] >> shift) & (kBuckets - 1)] == static_cast<uint32_t>(len)) continue;
      uint32_t sum = 0;
      for (int q = 0; q < kBuckets; ++q) {
        const uint32_t n = h[q];
        h[q] = sum;
        sum += n;
      }
      for (int64_t k = 0; k < len; ++k) dst[h[(src[k] >> shift) & (kBuckets - 1)]++] = src[k];
      std::swap(src, dst);
    }
    it = src;
  }
  for (int64_t k = 0; k < len; ++k) b.rank[static_cast<uint32_t>(it[k])] = static_cast<uint32_t>(k);
}

// keep[k] of model i on the row whose first element is tensor element j0 (della_mask).
void keep_row(const DellaParams& p, int i, const float* d, int64_t len, uint64_t j0, RowBuffers& b,
              uint8_t* keep) {
  const double density = p.density[i], eps = p.epsilon[i];
  if (density >= 1 || density <= 0) {
    memset(keep, density >= 1 ? 1 : 0, static_cast<size_t>(len));
    return;
  }
  const uint32_t key_lo = static_cast<uint32_t>(p.keys[i]);
  const uint32_t key_hi = static_cast<uint32_t>(p.keys[i] >> 32);
  philox_dare_block(key_lo, key_hi, j0, len, b.words);
  if (len == 1 || eps == 0) {
    const double q = std::min(std::max(density, 0.0), 1.0);
    const uint64_t thr = static_cast<uint64_t>(floor(q * kTwo32));
    for (int64_t k = 0; k < len; ++k) keep[k] = b.words[k] < thr;
    return;
  }
  rank_row(d, len, b);
  // the reference's float64 operations, in its order: (density - eps) + r * (2 eps / (n - 1))
  const double lo = density - eps, step = 2 * eps / static_cast<double>(len - 1);
  for (int64_t k = 0; k < len; ++k) {
    double q = lo + static_cast<double>(b.rank[k]) * step;
    q = q < 0 ? 0 : (q > 1 ? 1 : q);
    keep[k] = static_cast<uint64_t>(b.words[k]) < static_cast<uint64_t>(floor(q * kTwo32));
  }
}

// The row's base (float32) and task values of every model; counts NaN/Inf inputs.
void load_row(const Inputs& in, int64_t start, int64_t len, RowBuffers& b, int64_t* nonfinite) {
  for (int64_t s = 0; s < len; s += kBlock) {
    const int m = static_cast<int>(len - s < kBlock ? len - s : kBlock);
    load_block(in.base, in.base_dtype, start + s, m, b.base + s);
    nonfinite[in.n] += count_nonfinite(b.base + s, m);
    for (int i = 0; i < in.n; ++i) {
      float* di = b.d + static_cast<size_t>(i) * static_cast<size_t>(len) + s;
      load_block(in.models[i], in.model_dtypes[i], start + s, m, di);
      nonfinite[i] += count_nonfinite(di, m);
      const float* bb = b.base + s;
      for (int k = 0; k < m; ++k) di[k] = di[k] - bb[k];
    }
  }
}

inline uint64_t* mask_row(const DellaParams& p, int i, int64_t row) {
  const int64_t wpr = (p.row_len + 63) / 64;
  return p.mask + (static_cast<int64_t>(i) * p.mask_rows + row) * wpr;
}

void store_bits(const uint8_t* keep, int64_t len, uint64_t* w) {
  for (int64_t s = 0; s < len; s += 64) {
    uint64_t x = 0;
    const int64_t m = len - s < 64 ? len - s : 64;
    for (int64_t k = 0; k < m; ++k) x |= static_cast<uint64_t>(keep[s + k]) << k;
    w[s / 64] = x;
  }
}

void load_bits(const uint64_t* w, int64_t len, uint8_t* keep) {
  for (int64_t k = 0; k < len; ++k) keep[k] = static_cast<uint8_t>((w[k / 64] >> (k % 64)) & 1);
}

// Rows [r0, r1) of the chunk per dynamically scheduled item: about kChunk elements each.
int64_t rows_per_item(int64_t len) { return len >= kChunk ? 1 : kChunk / len; }

// Runs body(tid, buffers, row) over the chunk's rows on nthreads threads; per-thread NaN/Inf
// counts are added to nonfinite[n + 1]. False if a work buffer could not be allocated.
template <typename Body>
bool for_rows(const Inputs& in, int64_t len, int nthreads, int64_t* nonfinite, Body body) {
  const int64_t rows = in.numel / len;
  const int64_t per = rows_per_item(len);
  const int64_t items = (rows + per - 1) / per;
  int nt = effective_threads(in.numel, nthreads, int64_t{1} << 15);
  if (nt > items) nt = static_cast<int>(items < 1 ? 1 : items);
  if (nt > 64) nt = 64;
  int64_t nf[64][FM_MAX_MODELS + 1] = {};
  bool failed[64] = {};
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    RowBuffers b;
    const bool ok = b.alloc(len, in.n);
    if (!ok) failed[tid] = true;
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < items; ++q) {
      if (!ok) continue;
      const int64_t end = (q + 1) * per < rows ? (q + 1) * per : rows;
      for (int64_t r = q * per; r < end; ++r) {
        load_row(in, r * len, len, b, nf[tid]);
        body(b, r);
      }
    }
  }
  bool ok = true;
  for (int t = 0; t < nt; ++t) {
    ok = ok && !failed[t];
    for (int i = 0; i <= in.n; ++i) nonfinite[i] += nf[t][i];
  }
  return ok;
}

}  // namespace

bool della_reduce(const Inputs& in, const DellaParams& p, int64_t offset, double* l1,
                  int64_t* nonfinite, int nthreads) {
  const int64_t len = p.row_len;
  if (in.numel == 0 || len <= 0) return true;
  const int64_t rows = in.numel / len, row0 = offset / len;
  const int n = in.n;
  double* sums = static_cast<double*>(malloc(sizeof(double) * 2 * static_cast<size_t>(rows * n)));
  if (sums == nullptr) return false;
  const bool ok = for_rows(in, len, nthreads, nonfinite, [&](RowBuffers& b, int64_t r) {
    for (int i = 0; i < n; ++i) {
      const float* d = b.d + static_cast<size_t>(i) * static_cast<size_t>(len);
      uint8_t* keep = b.keep + static_cast<size_t>(i) * static_cast<size_t>(len);
      keep_row(p, i, d, len, static_cast<uint64_t>(offset + r * len), b, keep);
      if (p.mask != nullptr) store_bits(keep, len, mask_row(p, i, row0 + r));
      // eight lanes by column modulo 8, added in a fixed order: a function of the row alone
      double all[8] = {}, kept[8] = {};
      for (int64_t k = 0; k < len; ++k) {
        const double a = fabs(static_cast<double>(d[k]));
        all[k & 7] += a;
        kept[k & 7] += keep[k] ? a : 0.0;
      }
      double* s = sums + 2 * (r * n + i);
      s[0] = ((all[0] + all[1]) + (all[2] + all[3])) + ((all[4] + all[5]) + (all[6] + all[7]));
      s[1] =
          ((kept[0] + kept[1]) + (kept[2] + kept[3])) + ((kept[4] + kept[5]) + (kept[6] + kept[7]));
    }
  });
  for (int64_t r = 0; ok && r < rows; ++r)  // rows in order: the same sums in any chunking
    for (int q = 0; q < 2 * n; ++q) l1[q] += sums[2 * r * n + q];
  free(sums);
  return ok;
}

bool della_apply(const Inputs& in, const DellaParams& p, int64_t offset, void* out, int out_dtype,
                 int64_t* nonfinite, int nthreads) {
  const int64_t len = p.row_len;
  if (in.numel == 0 || len <= 0) return true;
  const int64_t row0 = offset / len;
  const int n = in.n;
  // the reference's float32 scalars: w_i, lambda, and della_linear's weight sum
  float lin_div = 0.0f;
  for (int i = 0; i < n; ++i) lin_div = lin_div + p.weight[i];
  if (fabsf(lin_div) < 1e-8f) lin_div = 1.0f;
  return for_rows(in, len, nthreads, nonfinite, [&](RowBuffers& b, int64_t r) {
    for (int i = 0; i < n; ++i) {
      const float* d = b.d + static_cast<size_t>(i) * static_cast<size_t>(len);
      uint8_t* keep = b.keep + static_cast<size_t>(i) * static_cast<size_t>(len);
      if (p.mask != nullptr)
        load_bits(mask_row(p, i, row0 + r), len, keep);
      else
        keep_row(p, i, d, len, static_cast<uint64_t>(offset + r * len), b, keep);
    }
    float* o = b.out;
    for (int64_t k = 0; k < len; ++k) {
      float v[FM_MAX_MODELS];
      float mixed = 0.0f;
      float sum = 0.0f;
      for (int i = 0; i < n; ++i) {
        const size_t at = static_cast<size_t>(i) * static_cast<size_t>(len) + k;
        float t = b.d[at] * (b.keep[at] ? 1.0f : 0.0f);
        t = t * p.scale[i];
        v[i] = p.weight[i] * t;
        sum = sum + v[i];
      }
      if (p.elect) {
        const float major = sum >= 0.0f ? 1.0f : -1.0f;
        float div = 0.0f;
        for (int i = 0; i < n; ++i) {
          const float sign = v[i] > 0.0f ? 1.0f : (v[i] < 0.0f ? -1.0f : 0.0f);
          const float agree = sign == major ? 1.0f : 0.0f;
          mixed = mixed + v[i] * agree;
          div = div + p.weight[i] * agree;
        }
        if (div == 0.0f) div = 1.0f;
        if (p.normalize) mixed = mixed / div;
      } else {
        mixed = sum;
        if (p.normalize) mixed = mixed / lin_div;
      }
      o[k] = b.base[k] + p.lambda * mixed;
    }
    for (int64_t s = 0; s < len; s += kBlock) {
      const int m = static_cast<int>(len - s < kBlock ? len - s : kBlock);
      store_block(out, out_dtype, r * len + s, m, o + s);
    }
  });
}

}  // namespace cpu
}  // namespace fastmerge
