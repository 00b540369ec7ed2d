// fastmerge CUDA backend: fused merge instantiations for all-16-bit inputs (bf16/fp16 in any
// mix): 8 elements per thread per group, one 16-byte load per input tensor.
#include "fm_merge.cuh"

namespace fmcuda {

cudaError_t fused_merge_16(const FmCudaInputs& in, const float* fparams, const int64_t* iparams,
                           const FmCudaMergeArgs& args, void* out, int64_t* nonfinite,
                           cudaStream_t stream) {
  FM_MERGE_DISPATCH(MergeShape16, MergeShapeAny16)
}

}  // namespace fmcuda
