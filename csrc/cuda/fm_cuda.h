// fastmerge CUDA backend: host launcher API (no torch, no CUDA device code).
//
// The .cu files of csrc/cuda implement these launchers with nvcc alone; the thin torch binding
// (fm_binding.cpp) calls them with data_ptr()s and the current stream. Every launcher is
// asynchronous on `stream` and returns cudaSuccess or the launch error.
//
// Semantics: exactly the three ops of fastmerge/backends/ops.py (score_histogram, model_stats,
// fused_merge); the per-element math comes from csrc/common (the same functions the C++ CPU
// backend executes), so the two backends cannot drift apart.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#define FM_CUDA_MAX_MODELS 32   // models per call (pointer arrays travel by value)
#define FM_CUDA_NUM_FPARAMS 6   // fastmerge.ops.NUM_FPARAMS
#define FM_CUDA_NUM_IPARAMS 3   // fastmerge.ops.NUM_IPARAMS
#define FM_CUDA_NUM_BINS 65536  // fastmerge.ops.NUM_BINS
#define FM_CUDA_HIST_LIMBS 10   // 28-bit limbs of the Fisher histograms' exact |t| sums

// Element types of the inputs and the output (any mix).
enum FmCudaDType : int32_t { FM_CUDA_F32 = 0, FM_CUDA_F16 = 1, FM_CUDA_BF16 = 2 };

// The tensors of one call: base (optional), N models, N second moments (optional), all with
// `numel` contiguous elements. Passed to the kernels by value (~800 bytes of kernel parameters).
struct FmCudaInputs {
  const void* base;  // nullptr: the models are task vectors
  const void* models[FM_CUDA_MAX_MODELS];
  const void* moments[FM_CUDA_MAX_MODELS];  // all nullptr when has_moments == 0
  int32_t base_dtype;
  int32_t model_dtype[FM_CUDA_MAX_MODELS];
  int32_t moment_dtype[FM_CUDA_MAX_MODELS];
  int32_t n_models;
  int32_t has_moments;
  int64_t numel;
};

// The scalar arguments of fastmerge::fused_merge after the packed parameter tensors.
struct FmCudaMergeArgs {
  int32_t combine, score, elect, elect_on, normalize, consensus_k;
  float scale, power, eps;
  int64_t offset;  // global index of element 0 (DARE Philox counter)
  int32_t out_dtype;
};

#ifdef __cplusplus
extern "C" {
#endif

// score_histogram: targets int64 [rows, 2] (device) = (model, level-1 prefix); counts int64
// [rows, 65536] and sums float64 [rows, 65536] (device) are accumulated in place. The Fisher
// score (score 1) adds |t| to `limbs` int64 [rows, 65536, FM_CUDA_HIST_LIMBS] (device, zeroed
// by the caller) instead of `sums`: limb k weighs 2^(28 k - 149), and the caller adds
// sum_k limbs[..., k] * 2^(28 k - 149) to sums (an exact, order-free integer sum). Every
// result is bit-identical from run to run.
cudaError_t fm_cuda_score_histogram(const FmCudaInputs* in, int32_t score, const int64_t* targets,
                                    int32_t rows, int32_t level, int64_t* counts, double* sums,
                                    int64_t* limbs, cudaStream_t stream);

// model_stats: fparams float32 [N, 6], iparams int64 [N, 3] (device); out float64 [N, 3]
// (device) += (sum|t_i|, sum|t_i| kept, sum max(v_i, 0)^power). `scratch` (device) holds
// fm_cuda_model_stats_scratch(in) doubles: per-block partial sums, added up in a fixed order
// by a second kernel (no float atomics: the same input gives the same bits every run).
int64_t fm_cuda_model_stats_scratch(const FmCudaInputs* in);
cudaError_t fm_cuda_model_stats(const FmCudaInputs* in, int32_t score, const float* fparams,
                                const int64_t* iparams, float power, int64_t offset, double* out,
                                double* scratch, cudaStream_t stream);

// fused_merge: writes `numel` elements of args->out_dtype to `out`; nonfinite int64 [N]
// (device) += the non-finite task-vector (linear: model) elements per model.
cudaError_t fm_cuda_fused_merge(const FmCudaInputs* in, const float* fparams,
                                const int64_t* iparams, const FmCudaMergeArgs* args, void* out,
                                int64_t* nonfinite, cudaStream_t stream);

// Where to start a fresh fused_merge output, in elements into storage aligned to 16 bytes, so
// that it is misaligned like the inputs (chunk views at an odd offset): fm_cuda_fused_merge then
// peels one head of element loads and vector-loads the rest. 0 for aligned inputs.
int32_t fm_cuda_fused_merge_out_shift(const FmCudaInputs* in, int32_t out_dtype);

#ifdef __cplusplus
}
#endif
