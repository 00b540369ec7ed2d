// fastmerge CUDA backend: the fused merge pass (fastmerge::fused_merge), kernel template.
//
// One grid-stride pass over groups of EPT consecutive elements. Per group, each thread issues
// one vector load per input tensor (16 bytes: 8 bf16/fp16 elements when every input is 16-bit,
// 4 elements when some input is float32) into raw registers, then runs the shared per-element
// merge (fastmerge::fm_merge_element, csrc/common/fastmerge_element.h) on each element and
// writes the output group with one vector store. Inputs are read exactly once, the output is
// written exactly once. Indices are 64-bit throughout (tensors of > 2^31 elements).
//
// NT > 0: exactly NT models, a compile-time constant, so the shared code's per-model loops
// unroll and its per-element arrays (t, s, v) live in registers. NT == 0: any N up to
// FM_MAX_MODELS at run time (per-element arrays in local memory; correct, slower).
// Non-finite task-vector elements are rare: they are counted with shared-memory atomics in the
// (cold) branch that sees one, and each block adds its counts to `nonfinite` once.
#pragma once

#include "fm_device.cuh"

namespace fmcuda {

// Group shapes: (elements per thread, raw words per tensor).
struct MergeShape16 { static constexpr int kEpt = 8, kWords = 4; };     // all inputs 16-bit
struct MergeShapeMixed { static constexpr int kEpt = 4, kWords = 4; };  // some input float32
struct MergeShapeAny16 { static constexpr int kEpt = 2, kWords = 1; };  // NT == 0, 16-bit
struct MergeShapeAnyMixed { static constexpr int kEpt = 1, kWords = 1; };

// Where the tensors' pointers and dtypes come from: the by-value kernel parameters when the
// model count is a compile-time constant (constant indices after unrolling), a shared-memory
// copy when it is not (NT == 0), the FmCudaInputs itself on the host (tests' harness).
struct ParamTable {
  const FmCudaInputs& in;
  __host__ __device__ FM_FORCE_INLINE const void* model(int i) const { return in.models[i]; }
  __host__ __device__ FM_FORCE_INLINE int model_dt(int i) const { return in.model_dtype[i]; }
  __host__ __device__ FM_FORCE_INLINE const void* moment(int i) const { return in.moments[i]; }
  __host__ __device__ FM_FORCE_INLINE int moment_dt(int i) const { return in.moment_dtype[i]; }
};

struct SharedTable {
  const void* const* ptr;  // [2 * FM_MAX_MODELS]: models, then moments
  const int* dt;
  __device__ FM_FORCE_INLINE const void* model(int i) const { return ptr[i]; }
  __device__ FM_FORCE_INLINE int model_dt(int i) const { return dt[i]; }
  __device__ FM_FORCE_INLINE const void* moment(int i) const { return ptr[FM_MAX_MODELS + i]; }
  __device__ FM_FORCE_INLINE int moment_dt(int i) const { return dt[FM_MAX_MODELS + i]; }
};

__host__ __device__ FM_FORCE_INLINE void count_nonfinite(unsigned int* counter) {
#if defined(__CUDA_ARCH__)
  atomicAdd(counter, 1u);  // shared memory; taken only for a NaN/Inf, which is rare
#else
  ++*counter;
#endif
}

// Group g (elements g*EPT .. g*EPT+EPT-1) of the merge: what one thread does per grid-stride
// step. n == NT when NT > 0 (a compile-time constant: the shared loops over c.n unroll).
template <int NT, int EPT, int WORDS, typename Table>
__host__ __device__ FM_FORCE_INLINE void merge_group(
    const FmCudaInputs& in, const Table& tab, const FmMergeConfig& cfg, const FmModel* models,
    const FmCudaMergeArgs& args, int64_t g, bool vec_ok, void* out, unsigned int* nonfinite) {
  constexpr int kMax = NT > 0 ? NT : FM_MAX_MODELS;
  const int n = cfg.n;
  const bool linear = args.combine == COMBINE_LINEAR;
  // linear averages the models themselves: the base is not read even when given
  const bool has_base = in.base != nullptr && !linear;
  const bool has_moments = in.has_moments != 0;
  const int64_t numel = in.numel;
  const int64_t i0 = g * EPT;
  const bool full = vec_ok && i0 + EPT <= numel;

  // 1. issue every load of the group before any math (memory-level parallelism)
  uint32_t wb[WORDS] = {};
  uint32_t wm[kMax][WORDS];
  uint32_t wv[kMax][WORDS];
  if (has_base) load_group<EPT, WORDS>(in.base, in.base_dtype, i0, numel, full, wb);
#pragma unroll
  for (int i = 0; i < kMax; ++i)
    if (i < n) load_group<EPT, WORDS>(tab.model(i), tab.model_dt(i), i0, numel, full, wm[i]);
  if (has_moments) {
#pragma unroll
    for (int i = 0; i < kMax; ++i)
      if (i < n) load_group<EPT, WORDS>(tab.moment(i), tab.moment_dt(i), i0, numel, full, wv[i]);
  }

  // 2. the shared per-element merge, element by element. The loop is deliberately NOT
  // unrolled: take_front() pops each tensor's next element from its register queue, so the
  // shared per-element code is instantiated once per kernel, not EPT times.
  uint32_t oq[EPT];
#pragma unroll
  for (int q = 0; q < EPT; ++q) oq[q] = 0u;
#pragma unroll 1
  for (int e = 0; e < EPT; ++e) {
    const float b = has_base ? take_front<EPT, WORDS>(wb, in.base_dtype) : 0.0f;
    float t[kMax];
    float v[kMax];
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
      if (i < n) {
        const float m = take_front<EPT, WORDS>(wm[i], tab.model_dt(i));
        t[i] = has_base ? fm_sub(m, b) : m;
        v[i] = has_moments ? take_front<EPT, WORDS>(wv[i], tab.moment_dt(i)) : 0.0f;
        if (!fm_isfinite(t[i]) && i0 + e < numel) count_nonfinite(nonfinite + i);
      }
    }
    // v is all zeros without second moments, which the shared code reads exactly like a null
    // v; passing the array unconditionally keeps t and v in registers.
    const float r = fm_merge_element(
        cfg, models, t, v, b, static_cast<uint64_t>(args.offset) + static_cast<uint64_t>(i0 + e));
    push_back<EPT>(oq, args.out_dtype, r);
  }

  // 3. one vector store of the output group
  store_queue<EPT>(out, args.out_dtype, i0, numel, full, oq);
}

// The per-block constants of the merge (also what the host harness builds).
__host__ __device__ FM_FORCE_INLINE FmMergeConfig merge_config(int n, const FmModel* models,
                                                               const FmCudaMergeArgs& a) {
  FmMergeConfig cfg = fm_make_config(n, models, a.combine, a.score, a.elect, a.elect_on,
                                     a.normalize, a.consensus_k, a.scale, a.power, a.eps);
  cfg.n = n;
  return cfg;
}

// Elements per group of the instantiation FM_MERGE_DISPATCH picks for a call.
inline int merge_ept(const FmCudaInputs& in) {
  const bool exact_n = in.n_models >= 1 && in.n_models <= 8;
  if (all_16bit(in)) return exact_n ? MergeShape16::kEpt : MergeShapeAny16::kEpt;
  return exact_n ? MergeShapeMixed::kEpt : MergeShapeAnyMixed::kEpt;
}

// Where a fresh output (16-byte aligned storage) should start, in elements, so that the
// merge's head also aligns it (fm_peel.h out_shift): 0 for aligned inputs.
inline int merge_out_shift(const FmCudaInputs& in, int out_dtype) {
  fmpeel::Span spans[2 * FM_MAX_MODELS + 2];
  const int c = launch_spans(in, nullptr, out_dtype, spans);
  return fmpeel::out_shift(spans, c, merge_ept(in), elem_size(out_dtype));
}

#if defined(__CUDACC__)
// Two resident blocks per SM (<= 128 registers) wherever ptxas then needs no spills (measured
// with tests/test_cuda_compile.py on sm_80 and sm_90): every exact-N all-16-bit kernel, and
// the mixed-dtype ones up to N = 6; the others keep every value in registers at one block.
template <int NT, int EPT>
constexpr int merge_min_blocks() {
  return (NT >= 1 && (EPT == 8 || NT <= 6)) ? 2 : 1;
}

template <int NT, int EPT, int WORDS>
__global__ void __launch_bounds__(kBlock, merge_min_blocks<NT, EPT>())
    fused_merge_kernel(const FmCudaInputs in, const float* __restrict__ fparams,
                       const int64_t* __restrict__ iparams, const FmCudaMergeArgs args,
                       void* __restrict__ out, unsigned long long* __restrict__ nonfinite,
                       const bool vec_ok) {
  constexpr int kMax = NT > 0 ? NT : FM_MAX_MODELS;
  __shared__ FmModel s_models[kMax];
  __shared__ unsigned int s_nonfinite[kMax];
  // NT == 0 indexes the tensors at run time: read their pointers from shared memory rather
  // than from the (by-value) parameter struct.
  __shared__ const void* s_ptr[NT > 0 ? 1 : 2 * FM_MAX_MODELS];
  __shared__ int s_dtype[NT > 0 ? 1 : 2 * FM_MAX_MODELS];

  const int n = NT > 0 ? NT : in.n_models;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s_models[i] = fm_unpack_model(fparams + static_cast<int64_t>(i) * NUM_FPARAMS,
                                  iparams + static_cast<int64_t>(i) * NUM_IPARAMS);
    s_nonfinite[i] = 0u;
    if constexpr (NT == 0) {
      s_ptr[i] = in.models[i];
      s_dtype[i] = in.model_dtype[i];
      s_ptr[FM_MAX_MODELS + i] = in.moments[i];
      s_dtype[FM_MAX_MODELS + i] = in.moment_dtype[i];
    }
  }
  __syncthreads();

  const FmMergeConfig cfg = merge_config(n, s_models, args);
  const int64_t groups = (in.numel + EPT - 1) / EPT;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    if constexpr (NT > 0) {
      merge_group<NT, EPT, WORDS>(in, ParamTable{in}, cfg, s_models, args, g, vec_ok, out,
                                  s_nonfinite);
    } else {
      merge_group<NT, EPT, WORDS>(in, SharedTable{s_ptr, s_dtype}, cfg, s_models, args, g, vec_ok,
                                  out, s_nonfinite);
    }
  }

  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    if (s_nonfinite[i]) atomicAdd(nonfinite + i, static_cast<unsigned long long>(s_nonfinite[i]));
}

// Launch one instantiation (grid-stride; grid from the kernel's occupancy). Pointers all
// misaligned by the same element count: the head runs with element loads, the body with
// vector loads and every element index (DARE's Philox counter) shifted by the head.
template <int NT, typename Shape>
cudaError_t launch_fused_merge(const FmCudaInputs& in, const float* fparams, const int64_t* iparams,
                               const FmCudaMergeArgs& args, void* out, int64_t* nonfinite,
                               cudaStream_t stream) {
  constexpr int kEpt = Shape::kEpt;
  auto kernel = fused_merge_kernel<NT, kEpt, Shape::kWords>;
  return launch_peeled(
      in, kEpt, out, args.out_dtype, [&](const FmCudaInputs& part, int64_t start, bool vec_ok) {
        FmCudaMergeArgs a = args;
        a.offset += start;
        void* o = const_cast<void*>(advance(out, args.out_dtype, start));
        const int64_t groups = (part.numel + kEpt - 1) / kEpt;
        const unsigned int grid = grid_for(kernel, groups, kBlock);
        kernel<<<grid, kBlock, 0, stream>>>(
            part, fparams, iparams, a, o, reinterpret_cast<unsigned long long*>(nonfinite), vec_ok);
        return cudaGetLastError();
      });
}

// Per-translation-unit dispatchers (compiled in parallel: fm_merge_16.cu, fm_merge_mixed.cu).
cudaError_t fused_merge_16(const FmCudaInputs& in, const float* fparams, const int64_t* iparams,
                           const FmCudaMergeArgs& args, void* out, int64_t* nonfinite,
                           cudaStream_t stream);
cudaError_t fused_merge_mixed(const FmCudaInputs& in, const float* fparams, const int64_t* iparams,
                              const FmCudaMergeArgs& args, void* out, int64_t* nonfinite,
                              cudaStream_t stream);

#define FM_MERGE_DISPATCH(SHAPE, ANY_SHAPE)                                                        \
  switch (in.n_models) {                                                                           \
    case 1:                                                                                        \
        return launch_fused_merge<1, SHAPE>(in, fparams, iparams, args, out, nonfinite, stream);   \
    case 2:                                                                                        \
        return launch_fused_merge<2, SHAPE>(in, fparams, iparams, args, out, nonfinite, stream);   \
    case 3:                                                                                        \
        return launch_fused_merge<3, SHAPE>(in, fparams, iparams, args, out, nonfinite, stream);   \
    case 4:                                                                                        \
        return launch_fused_merge<4, SHAPE>(in, fparams, iparams, args, out, nonfinite, stream);   \
    case 5:                                                                                        \
        return launch_fused_merge<5, SHAPE>(in, fparams, iparams, args, out, nonfinite, stream);   \
    case 6:                                                                                        \
        return launch_fused_merge<6, SHAPE>(in, fparams, iparams, args, out, nonfinite, stream);   \
    case 7:                                                                                        \
        return launch_fused_merge<7, SHAPE>(in, fparams, iparams, args, out, nonfinite, stream);   \
    case 8:                                                                                        \
        return launch_fused_merge<8, SHAPE>(in, fparams, iparams, args, out, nonfinite, stream);   \
    default:                                                                                       \
      return launch_fused_merge<0, ANY_SHAPE>(in, fparams, iparams, args, out, nonfinite, stream); \
  }

#endif  // __CUDACC__

}  // namespace fmcuda
