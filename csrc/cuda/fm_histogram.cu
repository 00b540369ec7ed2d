// fastmerge CUDA backend: radix digit histograms of the selection score
// (fastmerge::score_histogram; semantics in fastmerge/backends/ops.py and
// fastmerge/planning/selection.py).
//
// Grid (x: grid-stride over groups of 8 elements, y: the target row). Per group each thread
// loads 8 consecutive elements of the base, the row's model (and second moments) with one
// 16-byte vector load per 16-bit tensor (two per float32 tensor), then per element:
//   1. t = m - b, the score bits (shared fm_score_bits) and the 16-bit digit (level 0:
//      bits >> 16; level 1: bits & 0xFFFF of the elements whose bits >> 16 == prefix);
//   2. the warp's lanes with equal digits find each other (__match_any_sync) and their
//      leader adds the group's count and |t| sum once:
//      - counts: level 0 into a block-private shared-memory histogram of the 32768 possible
//        digits (128 KiB of dynamic shared memory; one global atomicAdd per non-empty bin
//        per block at the end), level 1 (65536 digits do not fit) straight to global memory;
//      - magnitude-score sums: the |t| of one digit share their exponent (level 0: and 7
//        mantissa bits; level 1: all bits), so the group's sum is its 24-bit mantissas' integer
//        sum (__reduce_add_sync) times a power of two, and every float64 addition is exact:
//        the sums do not depend on the order of the atomics (up to 2^29 elements per bin);
//      - Fisher-score sums (the digit does not bound |t|): each element adds |t| as exact
//        28-bit integer limbs of a 280-bit fixed-point number to `limbs` (int64 atomics are
//        order-free); the binding turns the limbs into float64 once, in a fixed order.
//   Non-finite |t| (Inf, NaN) are added to the float64 sums directly (order-free too).
// Integer counts are order-free, so the whole histogram is bit-identical from run to run.
// A GPU whose blocks cannot have 128 KiB of shared memory (sm_86, sm_89: 99 KiB) counts
// level 0 in global memory as well (same results).
#include "fm_device.cuh"

namespace fmcuda {
namespace {

constexpr int kIpt = 8;                   // elements per thread per group
constexpr int kWords = kIpt;              // raw words per tensor group (float32 allowed)
constexpr int kHistThreads = 1024;        // one big block per SM holds the 128 KiB histogram
constexpr int kLevel0Bins = 1 << 15;      // level-0 digits: the sign bit is cleared
constexpr uint32_t kNoBin = 0xFFFFFFFFu;  // lanes with nothing to add
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kLimbBits = 28;
constexpr int kNumLimbs = FM_CUDA_HIST_LIMBS;
constexpr size_t kSmemBytes = kLevel0Bins * sizeof(unsigned int);

// |t| (finite) as mant * 2^(shift - 149): adds mant << shift to the row's limbs of `at`.
__device__ FM_FORCE_INLINE void add_limbs(unsigned long long* limbs, int64_t at, uint32_t bits) {
  const int e = static_cast<int>(bits >> 23);
  const uint64_t mant = (bits & 0x7FFFFFu) | (e > 0 ? 0x800000u : 0u);
  const int shift = e > 1 ? e - 1 : 0;
  const int limb = shift / kLimbBits;
  const uint64_t v = mant << (shift - limb * kLimbBits);
  const uint64_t lo = v & ((1ull << kLimbBits) - 1);
  const uint64_t hi = v >> kLimbBits;
  unsigned long long* p = limbs + at * kNumLimbs + limb;
  if (lo) atomicAdd(p, static_cast<unsigned long long>(lo));
  if (hi) atomicAdd(p + 1, static_cast<unsigned long long>(hi));
}

__global__ void __launch_bounds__(kHistThreads)
    score_histogram_kernel(const FmCudaInputs in, const int score,
                           const int64_t* __restrict__ targets, const int level,
                           unsigned long long* __restrict__ counts, double* __restrict__ sums,
                           unsigned long long* __restrict__ limbs, const bool vec_ok,
                           const bool smem) {
  extern __shared__ unsigned int s_hist[];  // kLevel0Bins when level 0 and smem
  const int row = blockIdx.y;
  const int model = static_cast<int>(targets[2 * row]);
  const uint32_t prefix = static_cast<uint32_t>(targets[2 * row + 1]);
  if (model < 0 || model >= in.n_models) return;  // block-uniform: a bad row adds nothing
  const bool private_hist = smem && level == 0;
  if (private_hist) {
    for (int b = threadIdx.x; b < kLevel0Bins; b += blockDim.x) s_hist[b] = 0u;
    __syncthreads();
  }
  const bool has_base = in.base != nullptr;
  const bool fisher = score == SCORE_FISHER;  // |t| not bounded by the digit: limbs
  const bool has_v = fisher && in.has_moments;
  const int mdt = in.model_dtype[model];
  const int vdt = has_v ? in.moment_dtype[model] : DTYPE_FLOAT32;
  const int64_t numel = in.numel;
  const int64_t groups = (numel + kIpt - 1) / kIpt;
  const int64_t row_bins = static_cast<int64_t>(row) * NUM_BINS;
  const int lane = threadIdx.x & 31;

  // Warp-uniform loop bounds (the match/reduce intrinsics need every lane of the warp).
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x - lane; g0 < groups;
       g0 += stride) {
    const int64_t g = g0 + lane;
    const int64_t i0 = g * kIpt;
    const bool in_range = g < groups;
    const bool full = vec_ok && in_range && i0 + kIpt <= numel;
    uint32_t wb[kWords], wm[kWords], wv[kWords];
    if (in_range) {
      if (has_base) load_group<kIpt, kWords>(in.base, in.base_dtype, i0, numel, full, wb);
      load_group<kIpt, kWords>(in.models[model], mdt, i0, numel, full, wm);
      if (has_v) load_group<kIpt, kWords>(in.moments[model], vdt, i0, numel, full, wv);
    }
#pragma unroll
    for (int e = 0; e < kIpt; ++e) {
      uint32_t key = kNoBin, magbits = 0u;
      if (in_range && i0 + e < numel) {
        const float m = decode<kIpt, kWords>(wm, mdt, e);
        const float t = has_base ? fm_sub(m, decode<kIpt, kWords>(wb, in.base_dtype, e)) : m;
        const float v = has_v ? decode<kIpt, kWords>(wv, vdt, e) : 0.0f;
        const uint32_t bits = fm_score_bits(t, v, score);
        magbits = fm_f2u(fm_abs(t)) & 0x7FFFFFFFu;
        key = level == 0 ? (bits >> RADIX_BITS)
                         : ((bits >> RADIX_BITS) == prefix ? (bits & (NUM_BINS - 1)) : kNoBin);
      }
      const bool sel = key != kNoBin;
      const bool finite = (magbits >> 23) < 255u;
      const unsigned peers = __match_any_sync(kFull, key);
      const bool leader = lane == __ffs(peers) - 1;
      const int64_t at = row_bins + (sel ? key : 0u);
      if (sel && !finite) atomicAdd(sums + at, static_cast<double>(fm_u2f(magbits)));
      uint32_t mant = 0u;
      if (fisher) {
        if (sel && finite) add_limbs(limbs, at, magbits);
      } else if (sel && finite) {
        const uint32_t ex = magbits >> 23;
        mant = (magbits & 0x7FFFFFu) | (ex > 0 ? 0x800000u : 0u);
      }
      // the group's mantissa sum (< 32 * 2^24: exact in 32 bits), used by magnitude sums
      const unsigned msum = __reduce_add_sync(peers, mant);
      if (leader && sel) {
        const unsigned cnt = static_cast<unsigned>(__popc(peers));
        if (private_hist)
          atomicAdd(s_hist + key, cnt);
        else
          atomicAdd(counts + at, static_cast<unsigned long long>(cnt));
        if (!fisher && msum) {
          const int ex = static_cast<int>(magbits >> 23);
          atomicAdd(sums + at, ldexp(static_cast<double>(msum), (ex > 1 ? ex : 1) - 150));
        }
      }
    }
  }
  if (private_hist) {
    __syncthreads();
    for (int b = threadIdx.x; b < kLevel0Bins; b += blockDim.x)
      if (s_hist[b]) atomicAdd(counts + row_bins + b, static_cast<unsigned long long>(s_hist[b]));
  }
}

}  // namespace
}  // namespace fmcuda

extern "C" cudaError_t fm_cuda_score_histogram(const FmCudaInputs* in, int32_t score,
                                               const int64_t* targets, int32_t rows, int32_t level,
                                               int64_t* counts, double* sums, int64_t* limbs,
                                               cudaStream_t stream) {
  using namespace fmcuda;
  if (in == nullptr || (level != 0 && level != 1)) return cudaErrorInvalidValue;
  if (fastmerge::fm_check_models(in->n_models) != nullptr) return cudaErrorInvalidValue;
  if (in->numel <= 0 || rows <= 0) return cudaSuccess;
  if (score == fastmerge::SCORE_FISHER && limbs == nullptr) return cudaErrorInvalidValue;
  // level 0: the block-private histogram where the device allows 128 KiB per block
  bool smem = false;
  size_t dyn = 0;
  if (level == 0) {
    smem = cudaFuncSetAttribute(score_histogram_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(kSmemBytes)) == cudaSuccess;
    if (!smem) (void)cudaGetLastError();  // clear the refused attribute's error
    dyn = smem ? kSmemBytes : 0;
  }
  // A misaligned view: its head with element loads, the body with vector loads. Counts are
  // integers and sums exact, so the split changes no bit.
  return launch_peeled(
      *in, kIpt, nullptr, DTYPE_FLOAT32, [&](const FmCudaInputs& part, int64_t, bool vec_ok) {
        const int64_t groups = (part.numel + kIpt - 1) / kIpt;
        unsigned int gx = grid_for(score_histogram_kernel, groups, kHistThreads, dyn);
        gx = (gx + static_cast<unsigned int>(rows) - 1) / static_cast<unsigned int>(rows);
        if (gx < 1) gx = 1;
        const dim3 grid(gx, static_cast<unsigned int>(rows));
        score_histogram_kernel<<<grid, kHistThreads, dyn, stream>>>(
            part, score, targets, level, reinterpret_cast<unsigned long long*>(counts), sums,
            reinterpret_cast<unsigned long long*>(limbs), vec_ok, smem);
        return cudaGetLastError();
      });
}
