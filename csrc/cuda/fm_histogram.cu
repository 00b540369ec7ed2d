// fastmerge CUDA backend: radix digit histograms of the selection score
// (fastmerge::score_histogram; semantics in fastmerge/ops.py and fastmerge/selection.py).
//
// 65536 bins x (int64 count + float64 sum) per target row do not fit in shared memory, so the
// aggregation is per TILE instead of per block-private histogram:
//   1. each thread loads 8 consecutive elements of the base (once per tile) and, per target
//      row, of the row's model (and second moments): one 16-byte vector load per 16-bit tensor,
//      two per float32 tensor;
//   2. per element: t = m - b, score bits (shared fm_score_bits), its 16-bit digit (level 0:
//      bits >> 16; level 1: bits & 0xFFFF of the elements whose bits >> 16 == prefix, the
//      others get an out-of-range key: 0x8000 at level 0, 0x10000 at level 1);
//   3. cub::BlockRadixSort sorts the tile's 2048 (digit, |t| as float32) pairs by digit
//      (16 / 17 key bits), cub::BlockDiscontinuity flags run heads and tails, and
//      cub::BlockScan with cub::ReduceBySegmentOp reduces each run to (count, float64 sum);
//   4. the last element of each run adds its run's count and sum to global memory with one
//      atomicAdd each: one pair of atomics per distinct digit per tile, not per element.
// Level-1 tiles without a single element of the prefix skip steps 3-4 (__syncthreads_or).
// Grid: grid-stride over tiles, 256 threads per block, enough blocks for two waves.
// Cost: one read of base + the rows' models per level; the per-tile sort is the compute part
// (4 passes of 4-bit digits at level 0, 5 at level 1) and the first thing to tune on a GPU
// (see benchmarks/gpu.py: op score_histogram).
#include <cub/block/block_discontinuity.cuh>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/thread/thread_operators.cuh>
#include <cub/util_type.cuh>

#include "fm_device.cuh"

namespace fmcuda {
namespace {

constexpr int kIpt = 8;                    // elements per thread per tile
constexpr int kTile = kBlock * kIpt;       // 2048 elements per tile
constexpr int kWords = kIpt;               // raw words per tensor group (float32 allowed)
constexpr uint32_t kNoBin1 = 0x10000u;     // level 1: key of elements outside the histogram
constexpr int kKeyBits1 = 17;              // level 1 keys: digits 0..0xFFFF and kNoBin1
constexpr uint32_t kNoBin0 = 0x8000u;      // level 0: digits are < 0x8000 (sign bit cleared)
constexpr int kKeyBits0 = 16;              // level 0 keys: 0..0x7FFF and kNoBin0

struct CountSum {
  unsigned int count;
  double sum;
};

struct CountSumAdd {
  __device__ FM_FORCE_INLINE CountSum operator()(const CountSum& a, const CountSum& b) const {
    return CountSum{a.count + b.count, a.sum + b.sum};
  }
};

struct NotEqual {
  __device__ FM_FORCE_INLINE bool operator()(const uint32_t& a, const uint32_t& b) const {
    return a != b;
  }
};

// |t| rides along as float32 (exact: it is a float32) and is widened to float64 for the sums.
using BlockSort = cub::BlockRadixSort<uint32_t, kBlock, kIpt, float>;
using BlockDisc = cub::BlockDiscontinuity<uint32_t, kBlock>;
using RunPair = cub::KeyValuePair<int, CountSum>;
using BlockRunScan = cub::BlockScan<RunPair, kBlock>;

__global__ void __launch_bounds__(kBlock)
score_histogram_kernel(const FmCudaInputs in, const int score, const int64_t* __restrict__ targets,
                       const int rows, const int level, unsigned long long* __restrict__ counts,
                       double* __restrict__ sums, const bool vec_ok) {
  __shared__ union {
    typename BlockSort::TempStorage sort;
    typename BlockDisc::TempStorage disc;
    typename BlockRunScan::TempStorage scan;
  } temp;

  const int64_t numel = in.numel;
  const int64_t tiles = (numel + kTile - 1) / kTile;
  const bool has_base = in.base != nullptr;
  const bool fisher = score == SCORE_FISHER && in.has_moments;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i0 = tile * kTile + static_cast<int64_t>(threadIdx.x) * kIpt;
    const bool full = vec_ok && i0 + kIpt <= numel;
    float b[kIpt];
    {
      uint32_t wb[kWords];
      if (has_base) load_group<kIpt, kWords>(in.base, in.base_dtype, i0, numel, full, wb);
#pragma unroll
      for (int e = 0; e < kIpt; ++e)
        b[e] = has_base ? decode<kIpt, kWords>(wb, in.base_dtype, e) : 0.0f;
    }

    for (int r = 0; r < rows; ++r) {
      const int model = static_cast<int>(targets[2 * r]);
      const uint32_t prefix = static_cast<uint32_t>(targets[2 * r + 1]);
      if (model < 0 || model >= in.n_models) continue;  // uniform: bad row, nothing to add
      uint32_t wm[kWords], wv[kWords];
      const int mdt = in.model_dtype[model];
      const int vdt = fisher ? in.moment_dtype[model] : DTYPE_FLOAT32;
      load_group<kIpt, kWords>(in.models[model], mdt, i0, numel, full, wm);
      if (fisher) load_group<kIpt, kWords>(in.moments[model], vdt, i0, numel, full, wv);

      const uint32_t no_bin = level == 0 ? kNoBin0 : kNoBin1;
      uint32_t keys[kIpt];
      float mags[kIpt];
      bool any = false;
#pragma unroll
      for (int e = 0; e < kIpt; ++e) {
        const float m = decode<kIpt, kWords>(wm, mdt, e);
        const float t = has_base ? fm_sub(m, b[e]) : m;
        const float v = fisher ? decode<kIpt, kWords>(wv, vdt, e) : 0.0f;
        const uint32_t bits = fm_score_bits(t, v, score);
        uint32_t key = level == 0 ? (bits >> RADIX_BITS)
                                  : ((bits >> RADIX_BITS) == prefix ? (bits & (NUM_BINS - 1))
                                                                    : kNoBin1);
        if (i0 + e >= numel) key = no_bin;
        keys[e] = key;
        mags[e] = fm_abs(t);
        any |= key != no_bin;
      }
      if (!__syncthreads_or(any)) continue;  // block-uniform: nothing of this row here

      BlockSort(temp.sort).Sort(keys, mags, 0, level == 0 ? kKeyBits0 : kKeyBits1);  // blocked
      __syncthreads();
      int heads[kIpt], tails[kIpt];
      BlockDisc(temp.disc).FlagHeadsAndTails(heads, tails, keys, NotEqual());
      __syncthreads();
      RunPair runs[kIpt];
#pragma unroll
      for (int e = 0; e < kIpt; ++e) {
        runs[e].key = heads[e];
        runs[e].value = CountSum{1u, static_cast<double>(mags[e])};
      }
      BlockRunScan(temp.scan).InclusiveScan(runs, runs, cub::ReduceBySegmentOp<CountSumAdd>());
      __syncthreads();
#pragma unroll
      for (int e = 0; e < kIpt; ++e) {
        if (tails[e] && keys[e] != no_bin) {
          const int64_t at = static_cast<int64_t>(r) * NUM_BINS + keys[e];
          atomicAdd(counts + at, static_cast<unsigned long long>(runs[e].value.count));
          atomicAdd(sums + at, runs[e].value.sum);
        }
      }
    }
  }
}

}  // namespace
}  // namespace fmcuda

extern "C" cudaError_t fm_cuda_score_histogram(const FmCudaInputs* in, int32_t score,
                                               const int64_t* targets, int32_t rows,
                                               int32_t level, int64_t* counts, double* sums,
                                               cudaStream_t stream) {
  using namespace fmcuda;
  if (in == nullptr || (level != 0 && level != 1)) return cudaErrorInvalidValue;
  if (fastmerge::fm_check_models(in->n_models) != nullptr) return cudaErrorInvalidValue;
  if (in->numel <= 0 || rows <= 0) return cudaSuccess;
  const bool vec_ok = inputs_aligned(*in, kIpt, nullptr, DTYPE_FLOAT32);
  const int64_t tiles = (in->numel + kTile - 1) / kTile;
  unsigned int grid = grid_for(score_histogram_kernel, tiles * kBlock, kBlock);
  score_histogram_kernel<<<grid, kBlock, 0, stream>>>(
      *in, score, targets, rows, level, reinterpret_cast<unsigned long long*>(counts), sums,
      vec_ok);
  return cudaGetLastError();
}
