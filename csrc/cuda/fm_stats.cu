// fastmerge CUDA backend: per-model statistics (fastmerge::model_stats):
// out[i] += (sum |t_i|, sum |t_i| over the kept elements, sum max(v_i, 0)^power), float64.
//
// Grid: x = grid-stride over groups of 8 elements (16-byte loads of 16-bit inputs, two of
// float32), y = the model (one model's three sums per block). Each thread accumulates in
// float64; cub::BlockReduce folds the block's partial sums and thread 0 writes them to the
// scratch buffer; a second kernel (one block per model) adds each model's partials up in a
// fixed order and adds the result to `out`. No float atomics: the same input on the same
// device gives the same bits every run. Keep decisions (band, DARE Philox) and powers are the
// shared code's.
#include <cub/block/block_reduce.cuh>

#include "fm_device.cuh"

namespace fmcuda {
namespace {

constexpr int kEpt = 8;
constexpr int kWords = 8;

using BlockReduceD = cub::BlockReduce<double, kBlock>;

__global__ void __launch_bounds__(kBlock)
    model_stats_kernel(const FmCudaInputs in, const int score, const float* __restrict__ fparams,
                       const int64_t* __restrict__ iparams, const float power, const int64_t offset,
                       double* __restrict__ partial, const bool vec_ok) {
  __shared__ typename BlockReduceD::TempStorage temp;
  const int i = blockIdx.y;
  const FmModel model = fm_unpack_model(fparams + static_cast<int64_t>(i) * NUM_FPARAMS,
                                        iparams + static_cast<int64_t>(i) * NUM_IPARAMS);
  const bool has_base = in.base != nullptr;
  const bool has_moments = in.has_moments != 0;
  const void* mp = in.models[i];
  const int mdt = in.model_dtype[i];
  const void* vp = has_moments ? in.moments[i] : nullptr;
  const int vdt = has_moments ? in.moment_dtype[i] : DTYPE_FLOAT32;
  const int64_t numel = in.numel;
  const int64_t groups = (numel + kEpt - 1) / kEpt;

  double total = 0.0, kept = 0.0, powsum = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const int64_t i0 = g * kEpt;
    const bool full = vec_ok && i0 + kEpt <= numel;
    uint32_t wb[kWords], wm[kWords], wv[kWords];
    if (has_base) load_group<kEpt, kWords>(in.base, in.base_dtype, i0, numel, full, wb);
    load_group<kEpt, kWords>(mp, mdt, i0, numel, full, wm);
    if (has_moments) load_group<kEpt, kWords>(vp, vdt, i0, numel, full, wv);
#pragma unroll
    for (int e = 0; e < kEpt; ++e) {
      if (i0 + e < numel) {
        const float m = decode<kEpt, kWords>(wm, mdt, e);
        const float t = has_base ? fm_sub(m, decode<kEpt, kWords>(wb, in.base_dtype, e)) : m;
        const float v = has_moments ? decode<kEpt, kWords>(wv, vdt, e) : 0.0f;
        const double mag = static_cast<double>(fm_abs(t));
        total += mag;
        if (fm_keep(model, t, v, score, static_cast<uint64_t>(offset + i0 + e))) kept += mag;
        if (has_moments) powsum += static_cast<double>(fm_pow(v > 0.0f ? v : 0.0f, power));
      }
    }
  }
  const double a = BlockReduceD(temp).Sum(total);
  __syncthreads();
  const double k = BlockReduceD(temp).Sum(kept);
  __syncthreads();
  const double p = BlockReduceD(temp).Sum(powsum);
  if (threadIdx.x == 0) {
    double* row = partial + (static_cast<int64_t>(i) * gridDim.x + blockIdx.x) * 3;
    row[0] = a;
    row[1] = k;
    row[2] = has_moments ? p : 0.0;
  }
}

// out[i, s] += sum over the blocks b of partial[i, b, s], in a fixed order (one block per
// model: each thread sums a fixed stride of blocks, cub::BlockReduce folds them in a fixed tree).
__global__ void __launch_bounds__(kBlock)
    reduce_partials_kernel(const double* __restrict__ partial, const int blocks,
                           double* __restrict__ out) {
  __shared__ typename BlockReduceD::TempStorage temp;
  const int i = blockIdx.x;
  for (int s = 0; s < 3; ++s) {
    double acc = 0.0;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x)
      acc += partial[(static_cast<int64_t>(i) * blocks + b) * 3 + s];
    const double total = BlockReduceD(temp).Sum(acc);
    if (threadIdx.x == 0) out[3 * i + s] += total;
    __syncthreads();
  }
}

// Blocks per model of model_stats_kernel: the whole device, shared among the models.
unsigned int stats_blocks(const FmCudaInputs& in) {
  const int64_t groups = (in.numel + kEpt - 1) / kEpt;
  unsigned int gx = grid_for(model_stats_kernel, groups, kBlock);
  gx = (gx + in.n_models - 1) / in.n_models;
  return gx < 1 ? 1 : gx;
}

}  // namespace
}  // namespace fmcuda

extern "C" int64_t fm_cuda_model_stats_scratch(const FmCudaInputs* in) {
  if (in == nullptr || in->n_models <= 0 || in->numel <= 0) return 0;
  return static_cast<int64_t>(fmcuda::stats_blocks(*in)) * in->n_models * 3;
}

extern "C" cudaError_t fm_cuda_model_stats(const FmCudaInputs* in, int32_t score,
                                           const float* fparams, const int64_t* iparams,
                                           float power, int64_t offset, double* out,
                                           double* scratch, cudaStream_t stream) {
  using namespace fmcuda;
  if (in == nullptr) return cudaErrorInvalidValue;
  if (fastmerge::fm_check_models(in->n_models) != nullptr) return cudaErrorInvalidValue;
  if (in->numel <= 0) return cudaSuccess;
  if (scratch == nullptr) return cudaErrorInvalidValue;
  // No head is peeled here: the float64 partials are not exact, so their bits depend on which
  // elements each thread sums, and a peeled view would sum differently from an aligned copy.
  const bool vec_ok = inputs_aligned(*in, kEpt, nullptr, DTYPE_FLOAT32);
  const unsigned int gx = stats_blocks(*in);
  const dim3 grid(gx, static_cast<unsigned int>(in->n_models));
  model_stats_kernel<<<grid, kBlock, 0, stream>>>(*in, score, fparams, iparams, power, offset,
                                                  scratch, vec_ok);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_partials_kernel<<<in->n_models, kBlock, 0, stream>>>(scratch, static_cast<int>(gx), out);
  return cudaGetLastError();
}
