// fastmerge._core: the CPU kernels (csrc/cpu, the same sources as fastmerge._C) bound with
// pybind11 over Python buffers, without torch. `fastmerge merge` runs on it on the CPU
// (fastmerge/engine/native.py): importing torch took ~1 s of a 1.2 s whole-command 0.2B
// task_arithmetic merge here. Buffers are anything with the buffer protocol
// (mmap slices of the safetensors files, bytearrays); sizes are checked against numel and the
// dtype codes of fastmerge_params.h. The kernels run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string.h>

#include <string>
#include <tuple>
#include <vector>

#include "fm_cpu.h"

namespace py = pybind11;
namespace fm = fastmerge;

namespace {

int64_t itemsize(int dtype, const char* what) {
  switch (dtype) {
    case fm::DTYPE_FLOAT32: return 4;
    case fm::DTYPE_FLOAT16:
    case fm::DTYPE_BFLOAT16: return 2;
    default: throw py::value_error(std::string("fastmerge._core: ") + what +
                                   " has an unknown dtype code " + std::to_string(dtype));
  }
}

// Views of the input buffers (held in `views` while the kernel runs) as kernel Inputs.
struct Views {
  std::vector<py::buffer_info> views;
  fm::cpu::Inputs in;
};

const void* view(Views& v, const py::object& obj, int dtype, int64_t numel, const char* what,
                 bool writable = false) {
  py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request(writable);
  const int64_t need = numel * itemsize(dtype, what);
  const int64_t have = info.size * info.itemsize;
  if (have < need)
    throw py::value_error(std::string("fastmerge._core: ") + what + " holds " +
                          std::to_string(have) + " bytes, " + std::to_string(need) +
                          " are needed");
  const void* p = info.ptr;
  v.views.push_back(std::move(info));
  return p;
}

void make_inputs(Views& v, const py::object& base, int base_dtype, const py::list& models,
                 const std::vector<int>& model_dtypes, int64_t numel) {
  const int n = static_cast<int>(models.size());
  const char* err = fm::fm_check_models(n);
  if (err != nullptr) throw py::value_error(err);
  if (static_cast<int>(model_dtypes.size()) != n)
    throw py::value_error("fastmerge._core: one dtype code per model is needed");
  v.views.reserve(static_cast<size_t>(n) + 3);
  v.in.n = n;
  v.in.numel = numel;
  if (!base.is_none()) {
    v.in.base_dtype = base_dtype;
    v.in.base = view(v, base, base_dtype, numel, "base");
  }
  for (int i = 0; i < n; ++i) {
    v.in.model_dtypes[i] = model_dtypes[static_cast<size_t>(i)];
    v.in.models[i] = view(v, models[static_cast<size_t>(i)], model_dtypes[static_cast<size_t>(i)],
                          numel, "a model");
  }
}

std::vector<fm::FmModel> unpack(const py::bytes& fparams, const py::bytes& iparams, int n) {
  const std::string f = fparams, ip = iparams;
  if (f.size() != sizeof(float) * fm::NUM_FPARAMS * n ||
      ip.size() != sizeof(int64_t) * fm::NUM_IPARAMS * n)
    throw py::value_error("fastmerge._core: fparams / iparams must hold float32 [N, " +
                          std::to_string(fm::NUM_FPARAMS) + "] / int64 [N, " +
                          std::to_string(fm::NUM_IPARAMS) + "]");
  std::vector<fm::FmModel> out(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    out[static_cast<size_t>(i)] = fm::fm_unpack_model(
        reinterpret_cast<const float*>(f.data()) + i * fm::NUM_FPARAMS,
        reinterpret_cast<const int64_t*>(ip.data()) + i * fm::NUM_IPARAMS);
    const int mode = out[static_cast<size_t>(i)].mode;
    if (mode < fm::MODE_KEEP_ALL || mode > fm::MODE_DARE)
      throw py::value_error("fastmerge._core: unknown keep mode " + std::to_string(mode));
  }
  return out;
}

// The fused merge of one chunk into `out` (numel elements of out_dtype); returns the per-model
// counts of NaN/Inf task-vector values. Second-moment combines (ota, fisher) are not bound.
std::vector<int64_t> fused_merge(const py::object& base, int base_dtype, const py::list& models,
                                 const std::vector<int>& model_dtypes, const py::bytes& fparams,
                                 const py::bytes& iparams, int combine, int score, int elect,
                                 int elect_on, int normalize, int consensus_k, double scale,
                                 double power, double eps, int64_t offset, int64_t numel,
                                 const py::object& out, int out_dtype, int nthreads) {
  if (combine < 0 || combine >= fm::NUM_COMBINES || combine == fm::COMBINE_OTA ||
      score != fm::SCORE_MAGNITUDE)
    throw py::value_error("fastmerge._core: combine " + std::to_string(combine) + " / score " +
                          std::to_string(score) + " needs second moments (use fastmerge._C)");
  Views v;
  make_inputs(v, base, base_dtype, models, model_dtypes, numel);
  std::vector<fm::FmModel> ms = unpack(fparams, iparams, v.in.n);
  void* o = const_cast<void*>(view(v, out, out_dtype, numel, "out", true));
  const fm::FmMergeConfig cfg = fm::fm_make_config(
      v.in.n, ms.data(), combine, score, elect, elect_on, normalize, consensus_k,
      static_cast<float>(scale), static_cast<float>(power), static_cast<float>(eps));
  std::vector<int64_t> nonfinite(static_cast<size_t>(v.in.n), 0);
  bool ok;
  {
    py::gil_scoped_release free_gil;
    ok = fm::cpu::fused_merge(v.in, cfg, ms.data(), offset, o, out_dtype, nonfinite.data(),
                              nthreads);
  }
  if (!ok) throw std::bad_alloc();
  return nonfinite;
}

// Per model: (sum |t_i|, sum |t_i| over kept elements, sum max(v_i, 0)^power) of one chunk.
std::vector<double> model_stats(const py::object& base, int base_dtype, const py::list& models,
                                const std::vector<int>& model_dtypes, const py::bytes& fparams,
                                const py::bytes& iparams, double power, int64_t offset,
                                int64_t numel, int nthreads) {
  Views v;
  make_inputs(v, base, base_dtype, models, model_dtypes, numel);
  std::vector<fm::FmModel> ms = unpack(fparams, iparams, v.in.n);
  std::vector<double> out(static_cast<size_t>(3 * v.in.n), 0.0);
  {
    py::gil_scoped_release free_gil;
    fm::cpu::model_stats(v.in, fm::SCORE_MAGNITUDE, ms.data(), static_cast<float>(power), offset,
                         out.data(), nthreads);
  }
  return out;
}

// The exact k-th largest |t_i| for rows (model, k) of `requests` (int64 [R, 2] bytes) in one
// read pass: (threshold bits, -1 where the sampled window missed; the L1 each keeps; per-model
// total L1; per-model NaN/Inf counts), the L1 sums zero unless l1 (select.cpp).
std::tuple<std::vector<int64_t>, std::vector<double>, std::vector<double>, std::vector<int64_t>>
topk_window(const py::object& base, int base_dtype, const py::list& models,
            const std::vector<int>& model_dtypes, const py::bytes& requests, bool l1,
            int64_t numel, int nthreads) {
  Views v;
  make_inputs(v, base, base_dtype, models, model_dtypes, numel);
  const std::string rq = requests;
  if (rq.size() % (2 * sizeof(int64_t)) != 0)
    throw py::value_error("fastmerge._core: requests must hold int64 [R, 2]");
  const int R = static_cast<int>(rq.size() / (2 * sizeof(int64_t)));
  std::vector<int64_t> model(static_cast<size_t>(R)), k(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    memcpy(&model[static_cast<size_t>(r)], rq.data() + 16 * r, 8);
    memcpy(&k[static_cast<size_t>(r)], rq.data() + 16 * r + 8, 8);
    if (model[static_cast<size_t>(r)] < 0 || model[static_cast<size_t>(r)] >= v.in.n ||
        k[static_cast<size_t>(r)] < 1 || k[static_cast<size_t>(r)] > numel)
      throw py::value_error("fastmerge._core: request " + std::to_string(r) +
                            " needs 0 <= model < N and 1 <= k <= numel");
  }
  std::vector<int64_t> thr(static_cast<size_t>(R)), bad(static_cast<size_t>(v.in.n), 0);
  std::vector<double> kept(static_cast<size_t>(R)), total(static_cast<size_t>(v.in.n), 0.0);
  {
    py::gil_scoped_release free_gil;
    fm::cpu::topk_window(v.in, model.data(), k.data(), R, l1, thr.data(), kept.data(),
                         total.data(), bad.data(), nthreads);
  }
  return {thr, kept, total, bad};
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastmerge's CPU kernels over Python buffers, without torch (see native.py)";
  m.def("fused_merge", &fused_merge);
  m.def("model_stats", &model_stats);
  m.def("topk_window", &topk_window);
  // the DARE keep-bit memo is gone (each pass draws its masks, csrc/cpu/merge.cpp); kept as a
  // no-op returning 0 so callers that still set a limit need no change
  m.def("set_dare_bits_limit", [](size_t) { return size_t{0}; },
        "no-op (DARE masks are drawn in each pass); returns 0");
  m.def("isa", &fm::cpu::isa_name, "instruction set the kernels dispatch to");
}
