// Thin torch binding of the CUDA kernels: registers fastmerge::score_histogram, model_stats and
// fused_merge (schemas defined once in fastmerge/backends/ops.py) for the CUDA dispatch key and
// makes the library importable as the Python module ``fastmerge._cuda``. All the work is in the
// .cu launchers (fm_cuda.h); this file only checks arguments and passes data_ptr()s and the
// current CUDA stream.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <vector>

#include "fm_cuda.h"

namespace {

using at::Tensor;

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FM_CUDA_F32;
    case at::kHalf: return FM_CUDA_F16;
    case at::kBFloat16: return FM_CUDA_BF16;
    default: return -1;
  }
}

// Inputs as the kernels read them: contiguous, on `device`, of a supported element type
// (float64 and the like are converted to float32, which is what the math uses anyway).
Tensor prepare(const Tensor& x, const at::Device& device, const char* what) {
  TORCH_CHECK(x.device() == device, "fastmerge cuda: ", what, " is on ", x.device(), ", expected ",
              device);
  Tensor y = dtype_code(x.scalar_type()) < 0 ? x.to(at::kFloat) : x;
  return y.contiguous();
}

void check_cuda_int64_out(const Tensor& t, const at::Device& device, at::ScalarType dt,
                          const char* what) {
  TORCH_CHECK(t.device() == device, "fastmerge cuda: ", what, " must be on ", device);
  TORCH_CHECK(t.scalar_type() == dt, "fastmerge cuda: ", what, " has dtype ", t.scalar_type(),
              ", expected ", dt);
  TORCH_CHECK(t.is_contiguous(), "fastmerge cuda: ", what, " must be contiguous");
}

// Holds the prepared tensors alive while the launch is queued (the caching allocator keeps
// their memory stream-ordered, so releasing them after the launch is safe).
struct Prepared {
  std::vector<Tensor> keep;
  FmCudaInputs in{};
};

Prepared prepare_inputs(const c10::optional<Tensor>& base, at::TensorList models,
                        at::TensorList second_moments) {
  TORCH_CHECK(!models.empty(), "fastmerge cuda: at least one model tensor is required");
  TORCH_CHECK(static_cast<int64_t>(models.size()) <= FM_CUDA_MAX_MODELS, "fastmerge cuda: at most ",
              FM_CUDA_MAX_MODELS, " models per call, got ", models.size());
  TORCH_CHECK(second_moments.empty() || second_moments.size() == models.size(),
              "fastmerge cuda: second_moments must be empty or one per model");
  const at::Device device = models[0].device();
  TORCH_CHECK(device.is_cuda(), "fastmerge cuda: tensors must be CUDA tensors");
  const int64_t numel = models[0].numel();
  Prepared p;
  p.in.numel = numel;
  p.in.n_models = static_cast<int32_t>(models.size());
  p.in.has_moments = second_moments.empty() ? 0 : 1;
  if (base.has_value() && base->defined()) {
    TORCH_CHECK(base->numel() == numel, "fastmerge cuda: base has ", base->numel(),
                " elements, the models ", numel);
    Tensor b = prepare(*base, device, "base");
    p.in.base = b.data_ptr();
    p.in.base_dtype = dtype_code(b.scalar_type());
    p.keep.push_back(b);
  } else {
    p.in.base = nullptr;
    p.in.base_dtype = FM_CUDA_F32;
  }
  for (size_t i = 0; i < models.size(); ++i) {
    TORCH_CHECK(models[i].numel() == numel, "fastmerge cuda: model ", i, " has ", models[i].numel(),
                " elements, model 0 has ", numel);
    Tensor m = prepare(models[i], device, "a model tensor");
    p.in.models[i] = m.data_ptr();
    p.in.model_dtype[i] = dtype_code(m.scalar_type());
    p.keep.push_back(m);
    if (p.in.has_moments) {
      TORCH_CHECK(second_moments[i].numel() == numel, "fastmerge cuda: second moments of model ", i,
                  " have ", second_moments[i].numel(), " elements, the weights ", numel);
      Tensor v = prepare(second_moments[i], device, "a second-moment tensor");
      p.in.moments[i] = v.data_ptr();
      p.in.moment_dtype[i] = dtype_code(v.scalar_type());
      p.keep.push_back(v);
    } else {
      p.in.moments[i] = nullptr;
      p.in.moment_dtype[i] = FM_CUDA_F32;
    }
  }
  return p;
}

// The stream torch is using on `device` (what at::cuda::getCurrentCUDAStream returns; taken
// from c10 directly so this file needs no cuBLAS/cuSPARSE headers).
cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastmerge cuda: ", op,
              " launch failed: ", cudaGetErrorString(err));
}

// fparams [N, 6] and iparams [N, 3] on `device`, float32 and int64, contiguous.
struct Rows { Tensor fp, ip; };

Rows device_rows(const Tensor& fparams, const Tensor& iparams, const at::Device& device,
                 int64_t n) {
  Rows r{fparams.to(device, at::kFloat).contiguous(), iparams.to(device, at::kLong).contiguous()};
  TORCH_CHECK(r.fp.numel() == n * FM_CUDA_NUM_FPARAMS && r.ip.numel() == n * FM_CUDA_NUM_IPARAMS,
              "fastmerge cuda: fparams must be [N, 6] and iparams [N, 3]");
  return r;
}

void score_histogram_cuda(const c10::optional<Tensor>& base, at::TensorList models,
                          at::TensorList second_moments, int64_t score, const Tensor& targets,
                          int64_t level, Tensor& counts, Tensor& sums) {
  Prepared p = prepare_inputs(base, models, second_moments);
  const at::Device device = models[0].device();
  c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(level == 0 || level == 1, "fastmerge cuda: level must be 0 or 1, got ", level);
  TORCH_CHECK(score == 0 || p.in.has_moments,
              "fastmerge cuda: the fisher score needs "
              "second moments");
  Tensor tg = targets.to(device, at::kLong).contiguous();
  TORCH_CHECK(tg.dim() == 2 && tg.size(1) == 2, "fastmerge cuda: targets must be [T, 2]");
  const int64_t rows = tg.size(0);
  check_cuda_int64_out(counts, device, at::kLong, "counts");
  check_cuda_int64_out(sums, device, at::kDouble, "sums");
  TORCH_CHECK(counts.numel() == rows * FM_CUDA_NUM_BINS && sums.numel() == rows * FM_CUDA_NUM_BINS,
              "fastmerge cuda: counts and sums must be [T, 65536]");
  if (rows == 0 || p.in.numel == 0) return;
  // The Fisher score's |t| sums are exact integer limbs (order-free), turned into float64 here
  // once, in a fixed order (fm_cuda.h).
  Tensor limbs;
  if (score == 1)
    limbs =
        at::zeros({rows, FM_CUDA_NUM_BINS, FM_CUDA_HIST_LIMBS}, counts.options().dtype(at::kLong));
  check(fm_cuda_score_histogram(
            &p.in, static_cast<int32_t>(score), tg.data_ptr<int64_t>(), static_cast<int32_t>(rows),
            static_cast<int32_t>(level), counts.data_ptr<int64_t>(), sums.data_ptr<double>(),
            limbs.defined() ? limbs.data_ptr<int64_t>() : nullptr, current_stream(device)),
        "score_histogram");
  if (limbs.defined()) {
    Tensor scales = at::exp2(at::arange(FM_CUDA_HIST_LIMBS, sums.options()) * 28.0 - 149.0);
    sums.add_((limbs.to(at::kDouble) * scales).sum(-1).view_as(sums));
  }
}

void model_stats_cuda(const c10::optional<Tensor>& base, at::TensorList models,
                      at::TensorList second_moments, int64_t score, const Tensor& fparams,
                      const Tensor& iparams, double power, int64_t offset, Tensor& out) {
  Prepared p = prepare_inputs(base, models, second_moments);
  const at::Device device = models[0].device();
  c10::cuda::CUDAGuard guard(device);
  const auto [fp, ip] = device_rows(fparams, iparams, device, p.in.n_models);
  check_cuda_int64_out(out, device, at::kDouble, "out");
  TORCH_CHECK(out.numel() == p.in.n_models * 3, "fastmerge cuda: out must be [N, 3]");
  if (p.in.numel == 0) return;
  // per-block partial sums, added up in a fixed order by the launcher's second kernel
  Tensor scratch = at::empty({fm_cuda_model_stats_scratch(&p.in)}, out.options());
  check(fm_cuda_model_stats(&p.in, static_cast<int32_t>(score), fp.data_ptr<float>(),
                            ip.data_ptr<int64_t>(), static_cast<float>(power), offset,
                            out.data_ptr<double>(), scratch.data_ptr<double>(),
                            current_stream(device)),
        "model_stats");
}

Tensor fused_merge_cuda(const c10::optional<Tensor>& base, at::TensorList models,
                        at::TensorList second_moments, const Tensor& fparams, const Tensor& iparams,
                        int64_t combine, int64_t score, int64_t elect, int64_t elect_on,
                        int64_t normalize, int64_t consensus_k, double scale, double power,
                        double eps, int64_t offset, at::ScalarType out_dtype, Tensor& nonfinite) {
  Prepared p = prepare_inputs(base, models, second_moments);
  const at::Device device = models[0].device();
  c10::cuda::CUDAGuard guard(device);
  const int64_t n = p.in.n_models;
  const auto [fp, ip] = device_rows(fparams, iparams, device, n);
  check_cuda_int64_out(nonfinite, device, at::kLong, "nonfinite");
  TORCH_CHECK(nonfinite.numel() == n, "fastmerge cuda: nonfinite must have N elements");
  // The kernel writes float32/float16/bfloat16; any other requested dtype is one cast after.
  const bool direct = dtype_code(out_dtype) >= 0;
  const at::ScalarType kernel_dtype = direct ? out_dtype : at::kFloat;
  const auto out_options = models[0].options().dtype(kernel_dtype);
  // Inputs that are views at an odd element offset get an output misaligned like them, so the
  // launcher peels one short head and vector-loads (and stores) the rest.
  const int64_t shift = fm_cuda_fused_merge_out_shift(&p.in, dtype_code(kernel_dtype));
  Tensor out = shift == 0 ? at::empty(models[0].sizes(), out_options)
                          : at::empty({p.in.numel + shift}, out_options)
                                .narrow(0, shift, p.in.numel)
                                .view(models[0].sizes());
  if (p.in.numel == 0) return direct ? out : out.to(out_dtype);
  FmCudaMergeArgs a{};
  a.combine = static_cast<int32_t>(combine);
  a.score = static_cast<int32_t>(score);
  a.elect = static_cast<int32_t>(elect);
  a.elect_on = static_cast<int32_t>(elect_on);
  a.normalize = static_cast<int32_t>(normalize);
  a.consensus_k = static_cast<int32_t>(consensus_k);
  a.scale = static_cast<float>(scale);
  a.power = static_cast<float>(power);
  a.eps = static_cast<float>(eps);
  a.offset = offset;
  a.out_dtype = dtype_code(out.scalar_type());
  check(fm_cuda_fused_merge(&p.in, fp.data_ptr<float>(), ip.data_ptr<int64_t>(), &a, out.data_ptr(),
                            nonfinite.data_ptr<int64_t>(), current_stream(device)),
        "fused_merge");
  return direct ? out : out.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CUDA, m) {
  m.impl("score_histogram", &score_histogram_cuda);
  m.impl("model_stats", &model_stats_cuda);
  m.impl("fused_merge", &fused_merge_cuda);
}

// Importing ``fastmerge._cuda`` loads this library, which runs the registration above. The
// schemas themselves are defined in Python (fastmerge/backends/ops.py), so import it first.
extern "C" {
PyMODINIT_FUNC PyInit__cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT,
                                          "_cuda",
                                          "fastmerge CUDA kernels (registers the fastmerge:: "
                                          "ops for the CUDA dispatch key)",
                                          -1,
                                          nullptr,
                                          nullptr,
                                          nullptr,
                                          nullptr,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
