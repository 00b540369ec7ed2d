// fastmerge._C: the CPU kernels (csrc/cpu, the static library both bindings link) bound for
// torch. Registers the fastmerge:: ops (schemas defined in Python by fastmerge/backends/ops.py)
// for the CPU dispatch key and exposes a few helpers of the shared header to the tests. This file
// only turns tensors into the kernels' raw-pointer Inputs; the argument checks are checks.h's,
// shared with fastmerge._core (core.cpp), and all the work is in the kernels (fm_cpu.h).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "fm_cpu.h"
#include "output_cache.h"

namespace fm = fastmerge;

namespace {

// TORCH_CHECK of a checks.h result (RuntimeError "fastmerge (cpu): <message>")
#define FM_CHECK(expr)                                          \
  do {                                                          \
    const std::string fm_err_ = (expr);                         \
    TORCH_CHECK(fm_err_.empty(), "fastmerge (cpu): ", fm_err_); \
  } while (0)

int dtype_code(const at::Tensor& t, const char* what, int64_t index) {
  switch (t.scalar_type()) {
    case at::kFloat: return fm::DTYPE_FLOAT32;
    case at::kHalf: return fm::DTYPE_FLOAT16;
    case at::kBFloat16: return fm::DTYPE_BFLOAT16;
    default:
      TORCH_CHECK(false, "fastmerge (cpu): ", fm::checks::name(what, index), " has dtype ",
                  t.scalar_type(), "; supported: bfloat16, float16, float32");
  }
  return 0;
}

int out_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fm::DTYPE_FLOAT32;
    case at::kHalf: return fm::DTYPE_FLOAT16;
    case at::kBFloat16: return fm::DTYPE_BFLOAT16;
    default:
      TORCH_CHECK(false, "fastmerge (cpu): out_dtype ", t,
                  " is not supported; use bfloat16, float16 or float32");
  }
  return 0;
}

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "fastmerge (cpu): ", what, " is on ", t.device(),
              ", the CPU kernels need CPU tensors");
}

// [rows, cols] of a matrix, [-1, -1] otherwise (for checks::param_rows)
std::pair<int64_t, int64_t> shape2(const at::Tensor& t) {
  if (t.dim() != 2) return {-1, -1};
  return {t.size(0), t.size(1)};
}

// Contiguous views of the inputs (kept alive in `hold`) and the raw-pointer description.
fm::cpu::Inputs make_inputs(const std::optional<at::Tensor>& base, at::TensorList models,
                            at::TensorList moments, std::vector<at::Tensor>& hold) {
  const int64_t n = static_cast<int64_t>(models.size());
  FM_CHECK(fm::checks::models(n, static_cast<int64_t>(moments.size())));
  fm::cpu::Inputs in;
  in.n = static_cast<int>(n);
  in.numel = models[0].numel();
  auto add = [&](const at::Tensor& t, const char* what, int64_t i) -> const void* {
    check_cpu(t, what);
    FM_CHECK(fm::checks::elements(what, i, t.numel(), in.numel));
    hold.push_back(t.contiguous());
    return hold.back().data_ptr();
  };
  hold.reserve(1 + 2 * n);
  if (base.has_value() && base->defined()) {
    in.base_dtype = dtype_code(*base, "base", -1);
    in.base = add(*base, "base", -1);
  }
  for (int64_t i = 0; i < n; ++i) {
    in.model_dtypes[i] = dtype_code(models[i], "models", i);
    in.models[i] = add(models[i], "models", i);
  }
  in.has_moments = !moments.empty();
  for (int64_t i = 0; i < static_cast<int64_t>(moments.size()); ++i) {
    in.moment_dtypes[i] = dtype_code(moments[i], "second_moments", i);
    in.moments[i] = add(moments[i], "second_moments", i);
  }
  return in;
}

std::vector<fm::FmModel> unpack_models(const at::Tensor& fparams, const at::Tensor& iparams,
                                       int64_t n) {
  const auto fs = shape2(fparams), is = shape2(iparams);
  FM_CHECK(fm::checks::param_rows(fs.first, fs.second, is.first, is.second, n));
  const at::Tensor f = fparams.to(at::kCPU, at::kFloat).contiguous();
  const at::Tensor ip = iparams.to(at::kCPU, at::kLong).contiguous();
  std::vector<fm::FmModel> out;
  FM_CHECK(fm::checks::unpack_models(f.data_ptr<float>(), ip.data_ptr<int64_t>(), n, out));
  return out;
}

int threads() { return at::get_num_threads(); }

// An uninitialised CPU tensor; multi-MiB ones come from the freed-output cache
// (output_cache.h) and return to it when the tensor is freed.
at::Tensor new_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * at::elementSize(dtype);
  void* p = fm::cpu::output_acquire(bytes);
  if (p == nullptr) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::from_blob(
      p, sizes, [bytes](void* q) { fm::cpu::output_release(q, bytes); },
      at::TensorOptions().dtype(dtype));
}

// --------------------------------------------------------------------- the ops
void score_histogram_cpu(const std::optional<at::Tensor>& base, at::TensorList models,
                         at::TensorList second_moments, int64_t score, const at::Tensor& targets,
                         int64_t level, at::Tensor& counts, at::Tensor& sums) {
  TORCH_CHECK(!models.empty(), "fastmerge (cpu): score_histogram needs at least one model");
  TORCH_CHECK(targets.dim() == 2 && targets.size(1) == 2,
              "fastmerge (cpu): targets must be [T, 2], got ", targets.sizes());
  const int64_t T = targets.size(0);
  TORCH_CHECK(counts.dim() == 2 && counts.size(0) == T && counts.size(1) == fm::NUM_BINS &&
                  counts.scalar_type() == at::kLong,
              "fastmerge (cpu): counts must be int64 [", T, ", ", fm::NUM_BINS, "]");
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == T && sums.size(1) == fm::NUM_BINS &&
                  sums.scalar_type() == at::kDouble,
              "fastmerge (cpu): sums must be float64 [", T, ", ", fm::NUM_BINS, "]");
  check_cpu(counts, "counts");
  check_cpu(sums, "sums");
  const at::Tensor tg = targets.to(at::kCPU, at::kLong).contiguous();
  const int64_t* tp = tg.data_ptr<int64_t>();
  FM_CHECK(fm::checks::histogram_args(score, level, tp, T, static_cast<int64_t>(models.size()),
                                      static_cast<int64_t>(second_moments.size())));
  std::vector<at::Tensor> hold;
  fm::cpu::Inputs in = make_inputs(base, models, second_moments, hold);
  const bool direct = counts.is_contiguous() && sums.is_contiguous();
  at::Tensor c = direct ? counts : counts.contiguous();
  at::Tensor s = direct ? sums : sums.contiguous();
  const bool ok = fm::cpu::score_histogram(in, static_cast<int>(score), tp, static_cast<int>(T),
                                           static_cast<int>(level), c.data_ptr<int64_t>(),
                                           s.data_ptr<double>(), threads());
  TORCH_CHECK(ok, "fastmerge (cpu): could not allocate the histogram work buffers");
  if (!direct) {
    counts.copy_(c);
    sums.copy_(s);
  }
}

void model_stats_cpu(const std::optional<at::Tensor>& base, at::TensorList models,
                     at::TensorList second_moments, int64_t score, const at::Tensor& fparams,
                     const at::Tensor& iparams, double power, int64_t offset, at::Tensor& out) {
  TORCH_CHECK(!models.empty(), "fastmerge (cpu): model_stats needs at least one model");
  const int64_t n = static_cast<int64_t>(models.size());
  TORCH_CHECK(
      out.dim() == 2 && out.size(0) == n && out.size(1) == 3 && out.scalar_type() == at::kDouble,
      "fastmerge (cpu): out must be float64 [", n, ", 3], got ", out.sizes());
  check_cpu(out, "out");
  std::vector<at::Tensor> hold;
  fm::cpu::Inputs in = make_inputs(base, models, second_moments, hold);
  std::vector<fm::FmModel> ms = unpack_models(fparams, iparams, n);
  FM_CHECK(fm::checks::moments_needed(-1, score, ms, in.has_moments));
  at::Tensor o = out.is_contiguous() ? out : out.contiguous();
  fm::cpu::model_stats(in, static_cast<int>(score), ms.data(), static_cast<float>(power), offset,
                       o.data_ptr<double>(), threads());
  if (!out.is_contiguous()) out.copy_(o);
}

at::Tensor fused_merge_cpu(const std::optional<at::Tensor>& base, at::TensorList models,
                           at::TensorList second_moments, const at::Tensor& fparams,
                           const at::Tensor& iparams, int64_t combine, int64_t score, int64_t elect,
                           int64_t elect_on, int64_t normalize, int64_t consensus_k, double scale,
                           double power, double eps, int64_t offset, at::ScalarType out_dtype,
                           at::Tensor& nonfinite) {
  TORCH_CHECK(!models.empty(), "fastmerge (cpu): fused_merge needs at least one model");
  const int64_t n = static_cast<int64_t>(models.size());
  FM_CHECK(fm::checks::merge_enums(combine, score, elect, elect_on, normalize));
  TORCH_CHECK(
      nonfinite.dim() == 1 && nonfinite.size(0) == n && nonfinite.scalar_type() == at::kLong,
      "fastmerge (cpu): nonfinite must be int64 [", n, "]");
  check_cpu(nonfinite, "nonfinite");
  const int oc = out_code(out_dtype);
  std::vector<at::Tensor> hold;
  fm::cpu::Inputs in = make_inputs(base, models, second_moments, hold);
  std::vector<fm::FmModel> ms = unpack_models(fparams, iparams, n);
  FM_CHECK(fm::checks::moments_needed(combine, score, ms, in.has_moments));
  const fm::FmMergeConfig cfg = fm::fm_make_config(
      static_cast<int>(n), ms.data(), static_cast<int>(combine), static_cast<int>(score),
      static_cast<int>(elect), static_cast<int>(elect_on), static_cast<int>(normalize),
      static_cast<int>(consensus_k < INT32_MAX ? consensus_k : INT32_MAX),
      static_cast<float>(scale), static_cast<float>(power), static_cast<float>(eps));
  at::Tensor out = new_output(models[0].sizes(), out_dtype);
  int64_t nf[FM_MAX_MODELS] = {};
  const bool ok =
      fm::cpu::fused_merge(in, cfg, ms.data(), offset, out.data_ptr(), oc, nf, threads());
  TORCH_CHECK(ok, "fastmerge (cpu): could not allocate the merge work buffers");
  nonfinite.add_(at::from_blob(nf, {n}, at::kLong));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_window_impl(
    const std::optional<at::Tensor>& base, at::TensorList models, const at::Tensor& requests,
    bool l1, double margin_sd, int64_t isa) {
  TORCH_CHECK(!models.empty(), "fastmerge (cpu): topk_window needs at least one model");
  TORCH_CHECK(requests.dim() == 2 && requests.size(1) == 2,
              "fastmerge (cpu): requests must be [R, 2] (model, k), got ", requests.sizes());
  std::vector<at::Tensor> hold;
  fm::cpu::Inputs in = make_inputs(base, models, {}, hold);
  const at::Tensor rq = requests.to(at::kCPU, at::kLong).contiguous();
  const int64_t R = rq.size(0);
  std::vector<int64_t> model, k;
  FM_CHECK(fm::checks::requests(rq.data_ptr<int64_t>(), R, in.n, in.numel, model, k));
  at::Tensor thr = at::empty({R}, at::kLong);
  at::Tensor kept = at::zeros({R}, at::kDouble);
  at::Tensor total = at::zeros({in.n}, at::kDouble);
  at::Tensor bad = at::zeros({in.n}, at::kLong);
  fm::cpu::topk_window(in, model.data(), k.data(), static_cast<int>(R), l1, thr.data_ptr<int64_t>(),
                       kept.data_ptr<double>(), total.data_ptr<double>(), bad.data_ptr<int64_t>(),
                       threads(), margin_sd, static_cast<int>(isa));
  return {thr, kept, total, bad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_window_cpu(
    const std::optional<at::Tensor>& base, at::TensorList models, const at::Tensor& requests,
    bool l1) {
  return topk_window_impl(base, models, requests, l1, 5.0, 2);
}

// Level 1 of |t| for rows (model, prefix) of `targets` that each bin widths[r] consecutive
// prefixes, added into the flat int64 counts / float64 sums of sum(widths) * NUM_BINS cells:
// backend "cpu"'s guessed bins of a chunked selection, gathered in its level-0 read
// (fastmerge/planning/radix.py radix_select_one_read; _core binds the same kernel).
void score_histogram_windows(const std::optional<at::Tensor>& base,
                             const std::vector<at::Tensor>& models, const at::Tensor& targets,
                             const std::vector<int>& widths, at::Tensor& counts, at::Tensor& sums) {
  TORCH_CHECK(!models.empty(), "fastmerge (cpu): score_histogram_windows needs a model");
  TORCH_CHECK(targets.dim() == 2 && targets.size(1) == 2 &&
                  targets.size(0) == static_cast<int64_t>(widths.size()),
              "fastmerge (cpu): targets must be [T, 2] with T widths, got ", targets.sizes());
  const int64_t T = targets.size(0);
  const at::Tensor tg = targets.to(at::kCPU, at::kLong).contiguous();
  const int64_t* tp = tg.data_ptr<int64_t>();
  FM_CHECK(fm::checks::histogram_args(fm::SCORE_MAGNITUDE, 1, tp, T,
                                      static_cast<int64_t>(models.size()), 0));
  int64_t cells = 0;
  for (int64_t r = 0; r < T; ++r) {
    const int w = widths[static_cast<size_t>(r)];
    TORCH_CHECK(w >= 1 && tp[2 * r + 1] + w <= fm::NUM_BINS, "fastmerge (cpu): row ", r,
                ": prefixes [prefix, prefix + width) must be bins");
    cells += static_cast<int64_t>(w) * fm::NUM_BINS;
  }
  TORCH_CHECK(
      counts.numel() == cells && counts.scalar_type() == at::kLong && counts.is_contiguous() &&
          sums.numel() == cells && sums.scalar_type() == at::kDouble && sums.is_contiguous(),
      "fastmerge (cpu): counts / sums must be contiguous int64 / float64 of ", cells, " values");
  check_cpu(counts, "counts");
  check_cpu(sums, "sums");
  std::vector<at::Tensor> hold;
  fm::cpu::Inputs in = make_inputs(base, models, {}, hold);
  const bool ok = fm::cpu::score_histogram_windows(in, tp, widths.data(), static_cast<int>(T),
                                                   counts.data_ptr<int64_t>(),
                                                   sums.data_ptr<double>(), threads());
  TORCH_CHECK(ok, "fastmerge (cpu): could not allocate the histogram work buffers");
}

// --------------------------------------------------------------------- test helpers
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_window_test(
    const std::optional<at::Tensor>& base, const std::vector<at::Tensor>& models,
    const at::Tensor& requests, bool l1, double margin_sd, int64_t isa) {
  return topk_window_impl(base, models, requests, l1, margin_sd, isa);
}

pybind11::dict enums() {
  pybind11::dict d;
#define FM_ENUM(name) d[#name] = fm::name
  FM_ENUM(MODE_KEEP_ALL);
  FM_ENUM(MODE_BAND);
  FM_ENUM(MODE_KEEP_NONE);
  FM_ENUM(MODE_DARE);
  FM_ENUM(SCORE_MAGNITUDE);
  FM_ENUM(SCORE_FISHER);
  FM_ENUM(COMBINE_LINEAR);
  FM_ENUM(COMBINE_SUM);
  FM_ENUM(COMBINE_TIES);
  FM_ENUM(COMBINE_CONSENSUS_SUM);
  FM_ENUM(COMBINE_CONSENSUS_TIES);
  FM_ENUM(COMBINE_OTA);
  FM_ENUM(NUM_COMBINES);
  FM_ENUM(ELECT_SUM);
  FM_ENUM(ELECT_COUNT);
  FM_ENUM(ELECT_WEIGHTED);
  FM_ENUM(ELECT_UNWEIGHTED);
  FM_ENUM(NORMALIZE_NONE);
  FM_ENUM(NORMALIZE_WEIGHTS);
  FM_ENUM(NORMALIZE_COUNT);
  FM_ENUM(F_WEIGHT);
  FM_ENUM(F_RESCALE);
  FM_ENUM(F_LO);
  FM_ENUM(F_HI);
  FM_ENUM(F_CONSENSUS_LAMBDA);
  FM_ENUM(F_OTA_SCALE);
  FM_ENUM(NUM_FPARAMS);
  FM_ENUM(I_MODE);
  FM_ENUM(I_DARE_KEY);
  FM_ENUM(I_DARE_THRESHOLD);
  FM_ENUM(NUM_IPARAMS);
  FM_ENUM(RADIX_BITS);
  FM_ENUM(NUM_BINS);
  FM_ENUM(NONFINITE_BIN);
#undef FM_ENUM
  d["FM_MAX_MODELS"] = FM_MAX_MODELS;
  return d;
}

std::vector<uint32_t> philox4x32_10(std::vector<uint32_t> ctr, std::vector<uint32_t> key) {
  TORCH_CHECK(ctr.size() == 4 && key.size() == 2, "philox4x32_10(ctr[4], key[2])");
  fm::fm_philox4x32_10(ctr.data(), key[0], key[1]);
  return ctr;
}

// the DARE words of elements j = start .. start+count-1 (semantics v2: word j & 3 of counter
// j >> 2) through the shared header, one element at a time (int64 tensor of uint32 values)
at::Tensor dare_words(uint64_t key, uint64_t start, int64_t count) {
  at::Tensor out = at::empty({count}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  const uint32_t lo = static_cast<uint32_t>(key), hi = static_cast<uint32_t>(key >> 32);
  for (int64_t k = 0; k < count; ++k) p[k] = fm::fm_philox_dare_word(lo, hi, start + k);
  return out;
}

// the same through the SIMD block path (isa: 0 scalar, 1 AVX2, 2 AVX-512 or the best below it
// this CPU has); returns (words, path used)
std::tuple<at::Tensor, int> dare_words_block(uint64_t key, uint64_t start, int64_t count, int isa) {
  std::vector<uint32_t> w(static_cast<size_t>(count));
  const int used = fm::cpu::philox_dare_isa(
      static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), start, count, w.data(), isa);
  at::Tensor out = at::empty({count}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < count; ++k) p[k] = w[static_cast<size_t>(k)];
  return {out, used};
}

uint64_t dare_key(uint64_t seed, const std::string& name, uint64_t index) {
  return fm::fm_dare_key(seed, name.data(), name.size(), index);
}

// float32 -> bf16/fp16 through the header's rounding, returned as a tensor of that dtype
at::Tensor round_to(const at::Tensor& x, at::ScalarType dtype) {
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(xf.sizes(), xf.options().dtype(dtype));
  const int code = out_code(dtype);
  const float* src = xf.data_ptr<float>();
  for (int64_t k = 0; k < xf.numel(); ++k) fm::fm_store(out.data_ptr(), code, k, src[k]);
  return out;
}

// bf16/fp16/fp32 -> float32 through the header's loads
at::Tensor load_float(const at::Tensor& x) {
  const at::Tensor xc = x.contiguous();
  const int code = dtype_code(xc, "x", -1);
  at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  for (int64_t k = 0; k < xc.numel(); ++k) dst[k] = fm::fm_load(xc.data_ptr(), code, k);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) {
  m.impl("score_histogram", TORCH_FN(score_histogram_cpu));
  m.impl("model_stats", TORCH_FN(model_stats_cpu));
  m.impl("fused_merge", TORCH_FN(fused_merge_cpu));
  m.impl("topk_window", TORCH_FN(topk_window_cpu));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "fastmerge C++ CPU kernels (registers fastmerge:: ops for the CPU key)";
  mod.def("enums", &enums, "the enumerations of csrc/common/fastmerge_params.h");
  mod.def("philox4x32_10", &philox4x32_10, "Philox4x32-10 of the shared header");
  mod.def("dare_words", &dare_words, "the DARE words of a run of elements (shared header)");
  mod.def("dare_words_block", &dare_words_block,
          "the DARE words through the SIMD block path (for tests)");
  mod.def("dare_key", &dare_key, "splitmix64(seed ^ fnv1a64(name) ^ i * golden)");
  mod.def("round_to", &round_to, "float32 -> bf16/fp16 by the header's rounding");
  mod.def("load_float", &load_float, "bf16/fp16/fp32 -> float32 by the header's loads");
  mod.def("score_histogram_windows", &score_histogram_windows,
          "level-1 histograms of |t| for rows of several consecutive prefixes, added in place");
  mod.def("topk_window", &topk_window_test,
          "topk_window with the window margin and the scan path chosen (for tests)");
  mod.def(
      "set_output_cache_limit", [](size_t bytes) { return fm::cpu::output_cache_limit(bytes); },
      "bytes of freed fused_merge outputs kept for reuse (returns the previous limit)");
  mod.def("output_cache_bytes", &fm::cpu::output_cache_bytes, "bytes the output cache holds");
  mod.def("set_merge_fast_path", &fm::cpu::set_merge_fast_path,
          "fused_merge's AVX-512 block path on/off (returns the previous setting; for tests)");
  mod.def("set_store_half_isa", &fm::cpu::set_store_half_isa,
          "float16 store conversion: 0 scalar, 1 F16C, 2 best (for tests); returns the previous");
  mod.def("isa", &fm::cpu::isa_name, "instruction set the kernels dispatch to");
  mod.def("max_threads", &threads, "threads the kernels use (at::get_num_threads)");
}
