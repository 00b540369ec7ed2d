// fastmerge CPU backend: the float64 Gram matrix of a chunk's inputs (gram_matrix), the
// reduction pre-pass of the linear-combination methods (slerp, multislerp, karcher,
// model_stock, nuslerp over the whole tensor: fastmerge/pipeline/method_pass.py).
//
// One read of the mapped bytes: per block of kBlock elements every vector is converted once to
// float32 (the task vectors as the float32 difference m_i - b, as the reference computes them),
// and every pair (i <= j) adds the products of the values widened to float64 into kGramLanes
// float64 lanes (lane = element index mod kGramLanes). A product of two float32 values is exact in
// float64, so the scalar, AVX2 and AVX-512 clones (and an FMA or not) add the same numbers in
// the same order: the same bits on every CPU path. The range is cut into fixed work items of
// kChunk elements, each summed into its own slot, and the slots are added in item order, so
// the result does not depend on the thread count or the schedule either.
#include <omp.h>
#include <stdlib.h>

#include "fm_cpu_block.h"

namespace fastmerge {
namespace cpu {
namespace {

// float64 lanes per pair: two AVX-512 (four AVX2) dependency chains of adds per pair
constexpr int kGramLanes = 16;
static_assert(kBlock % kGramLanes == 0, "only a range's last block has a tail");

struct GramCtx {
  const void* const* vecs;
  const int* dtypes;
  int m;       // rows of the Gram matrix (vectors, or task vectors)
  bool tasks;  // rows are vecs[i] - vecs[m] (the base is the last vector)
};

// eight float64 / float32 lanes (GCC/clang vector extensions: one zmm, two ymm or four xmm per
// clone), as the compiler does not vectorise arrays of scalar accumulators itself
typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));

// (by pointer: a vector return value would change the ABI between the clones)
FM_FORCE_INLINE void widen(const float* p, v8d* out) {
  v8f f;
  memcpy(&f, p, sizeof(v8f));
  *out = __builtin_convertvector(f, v8d);
}

FM_FORCE_INLINE void load_lanes(const double* acc, v8d* s) {
  memcpy(&s[0], acc, sizeof(v8d));
  memcpy(&s[1], acc + 8, sizeof(v8d));
}

FM_FORCE_INLINE void store_lanes(const v8d* s, double* acc) {
  memcpy(acc, &s[0], sizeof(v8d));
  memcpy(acc + 8, &s[1], sizeof(v8d));
}

// the elements past the last whole group of kGramLanes, into their lanes
FM_FORCE_INLINE void tail_lanes(const float* x, const float* y, int k, int len, double* acc) {
  for (; k < len; ++k) acc[k % kGramLanes] += static_cast<double>(x[k]) * static_cast<double>(y[k]);
}

// All M(M+1)/2 pairs of M rows (kBlock floats apart) over len elements, every value widened once
// and every pair's lanes kept in registers: for the common small M (slerp, model_stock).
template <int M>
FM_FORCE_INLINE void block_pairs_fixed(const float* rows, int len, double* acc) {
  constexpr int P = M * (M + 1) / 2;
  v8d s[P][2];
  for (int p = 0; p < P; ++p) load_lanes(acc + p * kGramLanes, s[p]);
  int k = 0;
  for (; k + kGramLanes <= len; k += kGramLanes) {
    v8d x[M][2];
    for (int i = 0; i < M; ++i) {
      widen(rows + i * kBlock + k, &x[i][0]);
      widen(rows + i * kBlock + k + 8, &x[i][1]);
    }
    int p = 0;
    for (int i = 0; i < M; ++i) {
      for (int j = i; j < M; ++j, ++p) {
        s[p][0] += x[i][0] * x[j][0];
        s[p][1] += x[i][1] * x[j][1];
      }
    }
  }
  for (int p = 0; p < P; ++p) store_lanes(s[p], acc + p * kGramLanes);
  if (k < len) {
    int p = 0;
    for (int i = 0; i < M; ++i)
      for (int j = i; j < M; ++j, ++p)
        tail_lanes(rows + i * kBlock, rows + j * kBlock, k, len, acc + p * kGramLanes);
  }
}

// The same for any m, one pair at a time (the same lanes and order, so the same sums).
FM_FORCE_INLINE void block_pairs(const float* rows, int m, int len, double* acc) {
  for (int i = 0; i < m; ++i) {
    for (int j = i; j < m; ++j, acc += kGramLanes) {
      const float* x = rows + static_cast<size_t>(i) * kBlock;
      const float* y = rows + static_cast<size_t>(j) * kBlock;
      v8d s[2];
      load_lanes(acc, s);
      int k = 0;
      for (; k + kGramLanes <= len; k += kGramLanes) {
        v8d a[4];
        widen(x + k, &a[0]);
        widen(y + k, &a[1]);
        widen(x + k + 8, &a[2]);
        widen(y + k + 8, &a[3]);
        s[0] += a[0] * a[1];
        s[1] += a[2] * a[3];
      }
      store_lanes(s, acc);
      tail_lanes(x, y, k, len, acc);
    }
  }
}

// Pair sums of elements [begin, end) into acc[pairs][kGramLanes]; rows: m + 1 rows of kBlock
// float32 (the last one the base's block).
FM_CPU_CLONES
void gram_range(const GramCtx& c, int64_t begin, int64_t end, float* rows, double* acc) {
  float* base = rows + static_cast<size_t>(c.m) * kBlock;
  for (int64_t s = begin; s < end; s += kBlock) {
    const int len = static_cast<int>(end - s < kBlock ? end - s : kBlock);
    if (c.tasks) load_block(c.vecs[c.m], c.dtypes[c.m], s, len, base);
    for (int i = 0; i < c.m; ++i)
      load_task_block(c.vecs[i], c.dtypes[i], s, len, base, c.tasks,
                      rows + static_cast<size_t>(i) * kBlock);
    switch (c.m) {
      case 1: block_pairs_fixed<1>(rows, len, acc); break;
      case 2: block_pairs_fixed<2>(rows, len, acc); break;
      case 3: block_pairs_fixed<3>(rows, len, acc); break;
      case 4: block_pairs_fixed<4>(rows, len, acc); break;
      default: block_pairs(rows, c.m, len, acc); break;
    }
  }
}

// the lanes of one pair summed in a fixed tree
double lane_sum(const double* a) {
  double h[kGramLanes];
  for (int l = 0; l < kGramLanes; ++l) h[l] = a[l];
  for (int w = kGramLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) h[l] += h[l + w];
  return h[0];
}

}  // namespace

bool gram_matrix(const void* const* vecs, const int* dtypes, int n, int64_t numel, bool tasks,
                 double* out, int nthreads) {
  const int m = tasks ? n - 1 : n;
  for (int q = 0; q < m * m; ++q) out[q] = 0.0;
  if (m <= 0 || numel <= 0) return true;
  const GramCtx c{vecs, dtypes, m, tasks};
  const size_t pairs = static_cast<size_t>(m) * static_cast<size_t>(m + 1) / 2;
  const int64_t items = (numel + kChunk - 1) / kChunk;
  const int nt = effective_threads(numel, nthreads, kChunk);
  // per item: its pair sums; per thread: the lanes of the item it runs and the block buffers
  const size_t work = pairs * kGramLanes + (static_cast<size_t>(m) + 1) * kBlock / 2;
  double* slots = static_cast<double*>(malloc(sizeof(double) * static_cast<size_t>(items) * pairs));
  double* bufs = static_cast<double*>(malloc(sizeof(double) * work * static_cast<size_t>(nt)));
  if (slots == nullptr || bufs == nullptr) {
    free(slots);
    free(bufs);
    return false;
  }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t q = 0; q < items; ++q) {
    double* acc = bufs + work * static_cast<size_t>(omp_get_thread_num());
    float* rows = reinterpret_cast<float*>(acc + pairs * kGramLanes);
    for (size_t p = 0; p < pairs * kGramLanes; ++p) acc[p] = 0.0;
    const int64_t begin = q * kChunk;
    const int64_t end = numel - begin > kChunk ? begin + kChunk : numel;
    gram_range(c, begin, end, rows, acc);
    for (size_t p = 0; p < pairs; ++p)
      slots[static_cast<size_t>(q) * pairs + p] = lane_sum(acc + p * kGramLanes);
  }
  for (int64_t q = 0; q < items; ++q) {
    const double* a = slots + static_cast<size_t>(q) * pairs;
    for (int i = 0; i < m; ++i)
      for (int j = i; j < m; ++j) out[i * m + j] += *a++;
  }
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < i; ++j) out[i * m + j] = out[j * m + i];
  free(slots);
  free(bufs);
  return true;
}

}  // namespace cpu
}  // namespace fastmerge
