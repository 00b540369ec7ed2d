// fastmerge CUDA backend: public launcher of the fused merge pass (fm_cuda.h).
#include "fm_merge.cuh"

extern "C" cudaError_t fm_cuda_fused_merge(const FmCudaInputs* in, const float* fparams,
                                           const int64_t* iparams, const FmCudaMergeArgs* args,
                                           void* out, int64_t* nonfinite, cudaStream_t stream) {
  if (in == nullptr || args == nullptr) return cudaErrorInvalidValue;
  if (fastmerge::fm_check_models(in->n_models) != nullptr) return cudaErrorInvalidValue;
  if (in->numel <= 0) return cudaSuccess;
  return fmcuda::all_16bit(*in)
             ? fmcuda::fused_merge_16(*in, fparams, iparams, *args, out, nonfinite, stream)
             : fmcuda::fused_merge_mixed(*in, fparams, iparams, *args, out, nonfinite, stream);
}

extern "C" int32_t fm_cuda_fused_merge_out_shift(const FmCudaInputs* in, int32_t out_dtype) {
  if (in == nullptr || fastmerge::fm_check_models(in->n_models) != nullptr) return 0;
  return fmcuda::merge_out_shift(*in, out_dtype);
}
