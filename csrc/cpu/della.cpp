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

constexpr int64_t kSmallRow = 64;  // rows up to this length sort with std::sort
constexpr int64_t kLaneRow = 128;  // rows from this length sort in four lanes
constexpr double kTwo32 = 4294967296.0;

// Work buffers of one thread, sized for one row (malloc: no exception leaves an omp region).
struct RowBuffers {
  float* base = nullptr;    // [len] float32 base row
  float* d = nullptr;       // [n][len] task values, then the weighted pruned values
  uint8_t* keep = nullptr;  // [n][len] keep mask (0 / 1)
  uint64_t* thr = nullptr;  // [n][len] keep threshold of rank r (built once per model)
  bool built[FM_MAX_MODELS] = {};
  uint32_t* words = nullptr;   // [len] Philox words
  uint64_t* items = nullptr;   // [len] (|d| bits << 32 | column), sorted
  uint64_t* tmp = nullptr;     // [len] the radix sort's other buffer
  uint32_t* counts = nullptr;  // [4][2048] digit counters (per pass, or per lane)
  float* acc = nullptr;        // [3][len] float32 sums of the combine, then the output row

  bool alloc(int64_t len, int n) {
    const size_t l = static_cast<size_t>(len), m = static_cast<size_t>(n > 0 ? n : 1);
    base = static_cast<float*>(malloc(sizeof(float) * l));
    d = static_cast<float*>(malloc(sizeof(float) * l * m));
    keep = static_cast<uint8_t*>(malloc(l * m + 8));
    thr = static_cast<uint64_t*>(malloc(sizeof(uint64_t) * l * m));
    words = static_cast<uint32_t*>(malloc(sizeof(uint32_t) * l));
    items = static_cast<uint64_t*>(malloc(sizeof(uint64_t) * l));
    tmp = static_cast<uint64_t*>(malloc(sizeof(uint64_t) * l));
    counts = static_cast<uint32_t*>(malloc(sizeof(uint32_t) * 4 * 2048));
    acc = static_cast<float*>(malloc(sizeof(float) * 3 * l));
    return base && d && keep && thr && words && items && tmp && counts && acc;
  }
  ~RowBuffers() {
    free(base);
    free(d);
    free(keep);
    free(thr);
    free(words);
    free(items);
    free(tmp);
    free(counts);
    free(acc);
  }
};

inline uint32_t abs_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u & 0x7FFFFFFFu;  // |x|: its bits order like its value (NaN above Inf)
}

// The keep thresholds floor(p(r) * 2^32) of ranks r = 0 .. len-1: the reference's float64
// operations in its order, (density - eps) + r * (2 eps / (n - 1)), clamped to [0, 1].
void build_thresholds(double density, double eps, int64_t len, uint64_t* thr) {
  const double lo = density - eps, step = 2 * eps / static_cast<double>(len - 1);
  for (int64_t r = 0; r < len; ++r) {
    double q = lo + static_cast<double>(r) * step;
    q = q < 0 ? 0 : (q > 1 ? 1 : q);
    thr[r] = static_cast<uint64_t>(floor(q * kTwo32));
  }
}

// Digits of the LSD radix sort for a row of len items: buckets ~ the row length, so the
// counters' prefix sums stay cheap.
inline int digit_bits(int64_t len) {
  int digit = 8;
  while (digit < 11 && (int64_t{1} << (digit + 1)) <= len) ++digit;
  return digit;
}

// LSD radix sort of the packed items by the key bits [lo, lo + width) (the bits that vary in
// the row: the others are equal in every item, so they do not order them); stable, so ties
// keep the column order. Returns the sorted buffer (items or tmp).
uint64_t* radix_sort(uint64_t* it, uint64_t* tmp, uint32_t* counts, int64_t len, int lo,
                     int width) {
  const int digit = digit_bits(len);
  const int passes = (width + digit - 1) / digit;
  const int bits = (width + passes - 1) / passes;
  const uint32_t mask = (1u << bits) - 1u;
  const int buckets = 1 << bits;
  memset(counts, 0, sizeof(uint32_t) * static_cast<size_t>(passes * buckets));
  for (int64_t k = 0; k < len; ++k) {
    const uint32_t key = static_cast<uint32_t>(it[k] >> 32) >> lo;
    for (int q = 0; q < passes; ++q) ++counts[q * buckets + ((key >> (q * bits)) & mask)];
  }
  uint64_t* src = it;
  uint64_t* dst = tmp;
  for (int q = 0; q < passes; ++q) {
    uint32_t* h = counts + q * buckets;
    const int shift = 32 + lo + q * bits;
    if (h[(src[0] >> shift) & mask] == static_cast<uint32_t>(len)) continue;
    uint32_t sum = 0;
    for (int c = 0; c < buckets; ++c) {
      const uint32_t m = h[c];
      h[c] = sum;
      sum += m;
    }
    for (int64_t k = 0; k < len; ++k) dst[h[(src[k] >> shift) & mask]++] = src[k];
    std::swap(src, dst);
  }
  return src;
}

// radix_sort in four lanes (quarters of the row, each with its own counters, placed one after
// another), on 32-bit items (varying key bits << cb | column) where they fit, else on the
// packed 64-bit items: the counter updates form four independent chains instead of one, which
// the skewed digits of |d| (its exponent bits) kept serialised. ``shift0``: the key's lowest
// varying bit in an item. Returns the sorted buffer (it or tmp).
template <typename Item>
Item* radix_sort_lanes(Item* it, Item* tmp, uint32_t* counts, int64_t len, int shift0, int width) {
  const int digit = digit_bits(len);
  const int passes = (width + digit - 1) / digit;
  const int bits = (width + passes - 1) / passes;
  const uint32_t mask = (1u << bits) - 1u;
  const size_t buckets = size_t{1} << bits;
  const int64_t q4 = len / 4;  // lane 3 also takes the len % 4 last items
  Item* src = it;
  Item* dst = tmp;
  for (int q = 0; q < passes; ++q) {
    const int shift = shift0 + q * bits;
    uint32_t* h0 = counts;
    uint32_t* h1 = h0 + buckets;
    uint32_t* h2 = h1 + buckets;
    uint32_t* h3 = h2 + buckets;
    memset(counts, 0, sizeof(uint32_t) * 4 * buckets);
    const Item* s1 = src + q4;
    const Item* s2 = src + 2 * q4;
    const Item* s3 = src + 3 * q4;
    for (int64_t k = 0; k < q4; ++k) {
      ++h0[(src[k] >> shift) & mask];
      ++h1[(s1[k] >> shift) & mask];
      ++h2[(s2[k] >> shift) & mask];
      ++h3[(s3[k] >> shift) & mask];
    }
    for (int64_t k = 4 * q4; k < len; ++k) ++h3[(src[k] >> shift) & mask];
    const size_t first = (src[0] >> shift) & mask;
    if (h0[first] + h1[first] + h2[first] + h3[first] == static_cast<uint32_t>(len)) continue;
    uint32_t sum = 0;
    for (size_t c = 0; c < buckets; ++c) {  // a digit's lane 0 items, then lane 1's, ...
      for (uint32_t* h : {h0 + c, h1 + c, h2 + c, h3 + c}) {
        const uint32_t m = *h;
        *h = sum;
        sum += m;
      }
    }
    for (int64_t k = 0; k < q4; ++k) {
      const Item a = src[k], b = s1[k], c = s2[k], e = s3[k];
      dst[h0[(a >> shift) & mask]++] = a;
      dst[h1[(b >> shift) & mask]++] = b;
      dst[h2[(c >> shift) & mask]++] = c;
      dst[h3[(e >> shift) & mask]++] = e;
    }
    for (int64_t k = 4 * q4; k < len; ++k) dst[h3[(src[k] >> shift) & mask]++] = src[k];
    std::swap(src, dst);
  }
  return src;
}

// keep[k] = words[k] < thr[rank of column k by |d|, ties by column].
void keep_ranked(const float* d, int64_t len, const uint64_t* thr, RowBuffers& b, uint8_t* keep) {
  const uint32_t* words = b.words;
  if (len > int64_t{0xFFFFFFFF}) {  // columns no longer fit the packed items: a plain stable sort
    uint64_t* idx = b.items;
    for (int64_t k = 0; k < len; ++k) idx[k] = static_cast<uint64_t>(k);
    std::stable_sort(idx, idx + len,
                     [d](uint64_t x, uint64_t y) { return abs_bits(d[x]) < abs_bits(d[y]); });
    for (int64_t r = 0; r < len; ++r) keep[idx[r]] = words[idx[r]] < thr[r];
    return;
  }
  const uint32_t k0 = abs_bits(d[0]);
  uint32_t vary = 0;
  for (int64_t k = 0; k < len; ++k) vary |= abs_bits(d[k]) ^ k0;
  if (vary == 0) {  // all |d| equal: the ranks are the columns
    for (int64_t k = 0; k < len; ++k) keep[k] = words[k] < thr[k];
    return;
  }
  const int lo = __builtin_ctz(vary), hi = 31 - __builtin_clz(vary), width = hi - lo + 1;
  const int cb = 64 - __builtin_clzll(static_cast<uint64_t>(len - 1));  // column bits (len > 1)
  if (len >= kLaneRow && width + cb <= 32) {                            // 32-bit items
    uint32_t* it = reinterpret_cast<uint32_t*>(b.items);
    const uint32_t wmask = width == 32 ? ~0u : (1u << width) - 1u;
    for (int64_t k = 0; k < len; ++k)
      it[k] = (((abs_bits(d[k]) >> lo) & wmask) << cb) | static_cast<uint32_t>(k);
    it = radix_sort_lanes(it, reinterpret_cast<uint32_t*>(b.tmp), b.counts, len, cb, width);
    const uint32_t cmask = (1u << cb) - 1u;
    for (int64_t r = 0; r < len; ++r) {
      const uint32_t k = it[r] & cmask;
      keep[k] = words[k] < thr[r];
    }
    return;
  }
  uint64_t* it = b.items;
  for (int64_t k = 0; k < len; ++k)
    it[k] = (static_cast<uint64_t>(abs_bits(d[k])) << 32) | static_cast<uint64_t>(k);
  if (len <= kSmallRow)
    std::sort(it, it + len);  // (bits, column) pairs are distinct: the order is the stable one
  else if (len < kLaneRow)
    it = radix_sort(it, b.tmp, b.counts, len, lo, width);
  else
    it = radix_sort_lanes(it, b.tmp, b.counts, len, 32 + lo, width);
  for (int64_t r = 0; r < len; ++r) {
    const uint32_t k = static_cast<uint32_t>(it[r]);
    keep[k] = words[k] < thr[r];
  }
}

// keep[k] of model i on the row whose first element is tensor element j0 (della_mask).
void keep_row(const DellaParams& p, int i, const float* d, int64_t len, uint64_t j0, RowBuffers& b,
              uint8_t* keep) {
  const double density = p.density[i], eps = p.epsilon[i];
  if (density >= 1 || density <= 0) {
    memset(keep, density >= 1 ? 1 : 0, static_cast<size_t>(len));
    return;
  }
  philox_dare_block(static_cast<uint32_t>(p.keys[i]), static_cast<uint32_t>(p.keys[i] >> 32), j0,
                    len, b.words);
  if (len == 1 || eps == 0) {
    const double q = std::min(std::max(density, 0.0), 1.0);
    const uint64_t thr = static_cast<uint64_t>(floor(q * kTwo32));
    for (int64_t k = 0; k < len; ++k) keep[k] = b.words[k] < thr;
    return;
  }
  uint64_t* thr = b.thr + static_cast<size_t>(i) * static_cast<size_t>(len);
  if (!b.built[i]) {
    build_thresholds(density, eps, len, thr);
    b.built[i] = true;
  }
  keep_ranked(d, len, thr, b, keep);
}

// The row's base (float32) and task values of every model; counts NaN/Inf inputs.
FM_CPU_CLONES void load_row(const Inputs& in, int64_t start, int64_t len, float* base, float* d,
                            int64_t* nonfinite) {
  for (int64_t s = 0; s < len; s += kBlock) {
    const int m = static_cast<int>(len - s < kBlock ? len - s : kBlock);
    load_block(in.base, in.base_dtype, start + s, m, base + s);
    nonfinite[in.n] += count_nonfinite(base + s, m);
    for (int i = 0; i < in.n; ++i) {
      float* __restrict di = d + static_cast<size_t>(i) * static_cast<size_t>(len) + s;
      load_block(in.models[i], in.model_dtypes[i], start + s, m, di);
      nonfinite[i] += count_nonfinite(di, m);
      const float* __restrict bb = base + s;
      for (int k = 0; k < m; ++k) di[k] = di[k] - bb[k];
    }
  }
}

// (sum |d|, sum of the kept |d|) of a row in float64: eight lanes by column modulo 8, added in
// a fixed order, so the bits are a function of the row alone.
inline double kept_part(double a, uint8_t keep) {
  uint64_t u;  // a or +0 by a bit mask: no branch on the random mask
  memcpy(&u, &a, sizeof(u));
  u &= 0 - static_cast<uint64_t>(keep);
  memcpy(&a, &u, sizeof(u));
  return a;
}

FM_CPU_CLONES void l1_row(const float* __restrict d, const uint8_t* __restrict keep, int64_t len,
                          double* out) {
  double all[8] = {}, kept[8] = {};
  int64_t k = 0;
  for (; k + 8 <= len; k += 8)
    for (int j = 0; j < 8; ++j) {
      const double a = fabs(static_cast<double>(d[k + j]));
      all[j] += a;
      kept[j] += kept_part(a, keep[k + j]);
    }
  for (int j = 0; k < len; ++k, ++j) {
    const double a = fabs(static_cast<double>(d[k]));
    all[j] += a;
    kept[j] += kept_part(a, keep[k]);
  }
  out[0] = ((all[0] + all[1]) + (all[2] + all[3])) + ((all[4] + all[5]) + (all[6] + all[7]));
  out[1] =
      ((kept[0] + kept[1]) + (kept[2] + kept[3])) + ((kept[4] + kept[5]) + (kept[6] + kept[7]));
}

constexpr uint64_t kPackMul = 0x0102040810204080ull;    // 8 bytes of 0/1 -> 8 bits
constexpr uint64_t kSpreadMul = 0x0101010101010101ull;  // 8 bits -> a copy in every byte
constexpr uint64_t kBitOfByte = 0x8040201008040201ull;  // bit k of byte k

void store_bits(const uint8_t* keep, int64_t len, uint64_t* w) {
  for (int64_t s = 0; s < len; s += 64) {
    uint64_t x = 0;
    const int64_t m = len - s < 64 ? len - s : 64;
    int64_t k = 0;
    for (; k + 8 <= m; k += 8) {
      uint64_t y;
      memcpy(&y, keep + s + k, 8);
      x |= ((y * kPackMul) >> 56) << k;
    }
    for (; k < m; ++k) x |= static_cast<uint64_t>(keep[s + k]) << k;
    w[s / 64] = x;
  }
}

// keep needs 8 bytes of slack past len (RowBuffers allocates them)
void load_bits(const uint64_t* w, int64_t len, uint8_t* keep) {
  for (int64_t k = 0; k < len; k += 8) {
    const uint64_t bits = (w[k / 64] >> (k % 64)) & 0xFF;
    uint64_t y = (bits * kSpreadMul) & kBitOfByte;
    y = ((y + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull;
    memcpy(keep + k, &y, 8);
  }
}

// The merged row: the reference's float32 operations per element in its order (models in
// order), as loops over the row (one pass per model) that the compiler vectorises.
FM_CPU_CLONES void combine_row(const DellaParams& p, int n, int64_t len, float* d,
                               const uint8_t* keep, const float* __restrict base, float* acc,
                               float lin_div) {
  float* __restrict sum = acc;
  float* __restrict mixed = acc + len;
  float* __restrict div = acc + 2 * len;
  for (int64_t k = 0; k < len; ++k) sum[k] = 0.0f;
  for (int i = 0; i < n; ++i) {
    float* __restrict v = d + static_cast<size_t>(i) * static_cast<size_t>(len);
    const uint8_t* __restrict kp = keep + static_cast<size_t>(i) * static_cast<size_t>(len);
    const float s = p.scale[i], w = p.weight[i];
    for (int64_t k = 0; k < len; ++k) {
      float t = v[k] * (kp[k] ? 1.0f : 0.0f);
      t = t * s;
      v[k] = w * t;
      sum[k] = sum[k] + v[k];
    }
  }
  const float lam = p.lambda;
  if (!p.elect) {
    for (int64_t k = 0; k < len; ++k)
      sum[k] = base[k] + lam * (p.normalize ? sum[k] / lin_div : sum[k]);
    return;
  }
  for (int64_t k = 0; k < len; ++k) mixed[k] = div[k] = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float* __restrict v = d + static_cast<size_t>(i) * static_cast<size_t>(len);
    const float w = p.weight[i];
    for (int64_t k = 0; k < len; ++k) {
      const float major = sum[k] >= 0.0f ? 1.0f : -1.0f;
      const float sign = v[k] > 0.0f ? 1.0f : (v[k] < 0.0f ? -1.0f : 0.0f);
      const float agree = sign == major ? 1.0f : 0.0f;
      mixed[k] = mixed[k] + v[k] * agree;
      div[k] = div[k] + w * agree;
    }
  }
  for (int64_t k = 0; k < len; ++k) {
    const float dv = div[k] == 0.0f ? 1.0f : div[k];
    sum[k] = base[k] + lam * (p.normalize ? mixed[k] / dv : mixed[k]);
  }
}

inline uint64_t* mask_row(const DellaParams& p, int i, int64_t row) {
  const int64_t wpr = (p.row_len + 63) / 64;
  return p.mask + (static_cast<int64_t>(i) * p.mask_rows + row) * wpr;
}

// Rows [r0, r1) of the chunk per dynamically scheduled item: about kChunk elements each.
int64_t rows_per_item(int64_t len) { return len >= kChunk ? 1 : kChunk / len; }

// Runs body(buffers, row, written) over the chunk's rows on nthreads threads, each row loaded
// first; per-thread NaN/Inf counts are added to nonfinite[n + 1], and what the bodies count in
// their thread's `written` to *stored (when given). False if a work buffer could not be
// allocated.
template <typename Body>
bool for_rows(const Inputs& in, int64_t len, int nthreads, int64_t* nonfinite,
              StoredNonfinite* stored, Body body) {
  const int64_t rows = in.numel / len;
  const int64_t per = rows_per_item(len);
  const int64_t items = (rows + per - 1) / per;
  int nt = effective_threads(in.numel, nthreads, int64_t{1} << 15);
  if (nt > items) nt = static_cast<int>(items < 1 ? 1 : items);
  if (nt > 64) nt = 64;
  int64_t nf[64][FM_MAX_MODELS + 1] = {};
  StoredNonfinite written[64];
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
        load_row(in, r * len, len, b.base, b.d, nf[tid]);
        body(b, r, written[tid]);
      }
    }
  }
  bool ok = true;
  for (int t = 0; t < nt; ++t) {
    ok = ok && !failed[t];
    for (int i = 0; i <= in.n; ++i) nonfinite[i] += nf[t][i];
    if (stored != nullptr) stored->add(written[t].count, written[t].first);
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
  const bool ok = for_rows(
      in, len, nthreads, nonfinite, nullptr, [&](RowBuffers& b, int64_t r, StoredNonfinite&) {
        for (int i = 0; i < n; ++i) {
          const float* d = b.d + static_cast<size_t>(i) * static_cast<size_t>(len);
          uint8_t* keep = b.keep + static_cast<size_t>(i) * static_cast<size_t>(len);
          keep_row(p, i, d, len, static_cast<uint64_t>(offset + r * len), b, keep);
          if (p.mask != nullptr) store_bits(keep, len, mask_row(p, i, row0 + r));
          l1_row(d, keep, len, sums + 2 * (r * n + i));
        }
      });
  for (int64_t r = 0; ok && r < rows; ++r)  // rows in order: the same sums in any chunking
    for (int q = 0; q < 2 * n; ++q) l1[q] += sums[2 * r * n + q];
  free(sums);
  return ok;
}

bool della_apply(const Inputs& in, const DellaParams& p, int64_t offset, void* out, int out_dtype,
                 int64_t* nonfinite, int nthreads, StoredNonfinite* stored) {
  const int64_t len = p.row_len;
  if (in.numel == 0 || len <= 0) return true;
  const int64_t row0 = offset / len;
  const int n = in.n;
  // della_linear's divisor: the float32 sum of the weights in model order
  float lin_div = 0.0f;
  for (int i = 0; i < n; ++i) lin_div = lin_div + p.weight[i];
  if (fabsf(lin_div) < 1e-8f) lin_div = 1.0f;
  return for_rows(in, len, nthreads, nonfinite, stored,
                  [&](RowBuffers& b, int64_t r, StoredNonfinite& written) {
                    for (int i = 0; i < n; ++i) {
                      const float* d = b.d + static_cast<size_t>(i) * static_cast<size_t>(len);
                      uint8_t* keep = b.keep + static_cast<size_t>(i) * static_cast<size_t>(len);
                      if (p.mask != nullptr)
                        load_bits(mask_row(p, i, row0 + r), len, keep);
                      else
                        keep_row(p, i, d, len, static_cast<uint64_t>(offset + r * len), b, keep);
                    }
                    combine_row(p, n, len, b.d, b.keep, b.base, b.acc, lin_div);
                    for (int64_t s = 0; s < len; s += kBlock) {
                      const int m = static_cast<int>(len - s < kBlock ? len - s : kBlock);
                      if (store_block(out, out_dtype, r * len + s, m, b.acc + s))
                        count_stored(out, out_dtype, r * len + s, m, &written);
                    }
                  });
}

}  // namespace cpu
}  // namespace fastmerge
