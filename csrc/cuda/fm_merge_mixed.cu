// fastmerge CUDA backend: fused merge instantiations when some input is float32: 4 elements
// per thread per group (one 16-byte load per float32 tensor, 8 bytes per 16-bit tensor).
#include "fm_merge.cuh"

namespace fmcuda {

cudaError_t fused_merge_mixed(const FmCudaInputs& in, const float* fparams, const int64_t* iparams,
                              const FmCudaMergeArgs& args, void* out, int64_t* nonfinite,
                              cudaStream_t stream) {
  FM_MERGE_DISPATCH(MergeShapeMixed, MergeShapeAnyMixed)
}

}  // namespace fmcuda
