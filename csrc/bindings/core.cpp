// fastmerge._core: the CPU kernels (csrc/cpu, the static library both bindings link) bound with
// pybind11 over Python buffers, without torch. `fastmerge merge` runs on it on the CPU
// (fastmerge/pipeline/core_kernels.py): importing torch took ~1 s of a 1.2 s whole-command 0.2B
// task_arithmetic merge here. Buffers are anything with the buffer protocol (mmap slices of the
// safetensors files, bytearrays); their sizes, the dtype codes of fastmerge_params.h and the
// other arguments are checked by checks.h, the same checks as fastmerge._C's (torch_cpu.cpp).
// The kernels run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string.h>

#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "fm_cpu.h"

namespace py = pybind11;
namespace fm = fastmerge;

namespace {

// ValueError "fastmerge._core: <message>" of a checks.h result
void check(const std::string& err) {
  if (!err.empty()) throw py::value_error("fastmerge._core: " + err);
}

// Views of the input buffers (held in `views` while the kernel runs) as kernel Inputs.
struct Views {
  std::vector<py::buffer_info> views;
  fm::cpu::Inputs in;
};

const void* view(Views& v, const py::object& obj, int dtype, int64_t numel, const char* what,
                 int64_t index, bool writable = false) {
  py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request(writable);
  check(fm::checks::bytes(what, index, info.size * info.itemsize, numel, dtype));
  const void* p = info.ptr;
  v.views.push_back(std::move(info));
  return p;
}

void make_inputs(Views& v, const py::object& base, int base_dtype, const py::list& models,
                 const std::vector<int>& model_dtypes, int64_t numel) {
  const int64_t n = static_cast<int64_t>(models.size());
  check(fm::checks::models(n, 0));
  if (static_cast<int64_t>(model_dtypes.size()) != n) check("one dtype code per model is needed");
  v.views.reserve(static_cast<size_t>(n) + 3);
  v.in.n = static_cast<int>(n);
  v.in.numel = numel;
  if (!base.is_none()) {
    v.in.base_dtype = base_dtype;
    v.in.base = view(v, base, base_dtype, numel, "base", -1);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int dt = model_dtypes[static_cast<size_t>(i)];
    v.in.model_dtypes[i] = dt;
    v.in.models[i] = view(v, models[static_cast<size_t>(i)], dt, numel, "models", i);
  }
}

// the parameter rows (float32 / int64 row-major bytes, fastmerge/methods/kernel_params.py)
std::vector<fm::FmModel> unpack(const py::bytes& fparams, const py::bytes& iparams, int64_t n) {
  const std::string f = fparams, ip = iparams;
  const size_t frow = sizeof(float) * fm::NUM_FPARAMS, irow = sizeof(int64_t) * fm::NUM_IPARAMS;
  check(fm::checks::param_rows(
      f.size() % frow ? -1 : static_cast<int64_t>(f.size() / frow), fm::NUM_FPARAMS,
      ip.size() % irow ? -1 : static_cast<int64_t>(ip.size() / irow), fm::NUM_IPARAMS, n));
  // copies: the bytes' storage carries no alignment promise for float / int64
  std::vector<float> fv(f.size() / sizeof(float));
  std::vector<int64_t> iv(ip.size() / sizeof(int64_t));
  memcpy(fv.data(), f.data(), f.size());
  memcpy(iv.data(), ip.data(), ip.size());
  std::vector<fm::FmModel> out;
  check(fm::checks::unpack_models(fv.data(), iv.data(), n, out));
  return out;
}

// (count, chunk index of the first or -1) of the NaN/Inf values a kernel's store wrote
using Stored = std::tuple<int64_t, int64_t>;

// The fused merge of one chunk into `out` (numel elements of out_dtype); returns the per-model
// counts of NaN/Inf task-vector values and the store's count of NaN/Inf output values (so the
// pipeline makes no second pass over the output). Second-moment combines (ota, fisher) are not
// bound.
std::tuple<std::vector<int64_t>, Stored> fused_merge(
    const py::object& base, int base_dtype, const py::list& models,
    const std::vector<int>& model_dtypes, const py::bytes& fparams, const py::bytes& iparams,
    int combine, int score, int elect, int elect_on, int normalize, int consensus_k, double scale,
    double power, double eps, int64_t offset, int64_t numel, const py::object& out, int out_dtype,
    int nthreads) {
  check(fm::checks::merge_enums(combine, score, elect, elect_on, normalize));
  if (combine == fm::COMBINE_OTA || score != fm::SCORE_MAGNITUDE)
    check("combine " + std::to_string(combine) + " / score " + std::to_string(score) +
          " needs second moments (use fastmerge._C)");
  Views v;
  make_inputs(v, base, base_dtype, models, model_dtypes, numel);
  std::vector<fm::FmModel> ms = unpack(fparams, iparams, v.in.n);
  void* o = const_cast<void*>(view(v, out, out_dtype, numel, "out", -1, true));
  const fm::FmMergeConfig cfg = fm::fm_make_config(
      v.in.n, ms.data(), combine, score, elect, elect_on, normalize, consensus_k,
      static_cast<float>(scale), static_cast<float>(power), static_cast<float>(eps));
  std::vector<int64_t> nonfinite(static_cast<size_t>(v.in.n), 0);
  fm::cpu::StoredNonfinite stored;
  bool ok;
  {
    py::gil_scoped_release free_gil;
    ok = fm::cpu::fused_merge(v.in, cfg, ms.data(), offset, o, out_dtype, nonfinite.data(),
                              nthreads, &stored);
  }
  if (!ok) throw std::bad_alloc();
  return {nonfinite, {stored.count, stored.first}};
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
            const std::vector<int>& model_dtypes, const py::bytes& requests, bool l1, int64_t numel,
            int nthreads) {
  Views v;
  make_inputs(v, base, base_dtype, models, model_dtypes, numel);
  const std::string rq = requests;
  if (rq.size() % (2 * sizeof(int64_t)) != 0) check("requests must hold int64 [R, 2]");
  const int64_t R = static_cast<int64_t>(rq.size() / (2 * sizeof(int64_t)));
  std::vector<int64_t> rows(static_cast<size_t>(2 * R)), model, k;
  memcpy(rows.data(), rq.data(), rq.size());
  check(fm::checks::requests(rows.data(), R, v.in.n, numel, model, k));
  std::vector<int64_t> thr(static_cast<size_t>(R)), bad(static_cast<size_t>(v.in.n), 0);
  std::vector<double> kept(static_cast<size_t>(R)), total(static_cast<size_t>(v.in.n), 0.0);
  {
    py::gil_scoped_release free_gil;
    fm::cpu::topk_window(v.in, model.data(), k.data(), static_cast<int>(R), l1, thr.data(),
                         kept.data(), total.data(), bad.data(), nthreads);
  }
  return {thr, kept, total, bad};
}

// della / della_linear over a chunk of whole rows (della.cpp): with `out` None the reduce pass
// (returns l1 plus this chunk's L1 sums, and may fill `mask`), else the apply pass into `out`;
// both return the per-input NaN/Inf counts (models, then the base), and the store's count of
// NaN/Inf output values as fused_merge ((0, -1) for the reduce pass). `mask`: None, or a buffer
// of n * mask_rows * ceil(row_len / 64) uint64 words (the whole tensor's keep bits).
std::tuple<std::vector<double>, std::vector<int64_t>, Stored> della(
    const py::object& base, int base_dtype, const py::list& models,
    const std::vector<int>& model_dtypes, int64_t row_len, int64_t offset, int64_t numel,
    const std::vector<double>& density, const std::vector<double>& epsilon,
    const std::vector<uint64_t>& keys, std::vector<double> l1, const py::object& mask,
    int64_t mask_rows, const std::vector<double>& weight, const std::vector<double>& scale,
    double lam, bool elect, bool normalize, const py::object& out, int out_dtype, int nthreads) {
  if (base.is_none()) check("della needs the base model");
  if (row_len < 1 || numel % row_len != 0 || offset % row_len != 0 || offset < 0)
    check("della: a chunk of whole rows (row_len " + std::to_string(row_len) + ", offset " +
          std::to_string(offset) + ", numel " + std::to_string(numel) + ")");
  Views v;
  make_inputs(v, base, base_dtype, models, model_dtypes, numel);
  const size_t n = static_cast<size_t>(v.in.n);
  const bool apply = !out.is_none();
  if (density.size() != n || epsilon.size() != n || keys.size() != n || l1.size() != 2 * n ||
      (apply && (weight.size() != n || scale.size() != n)))
    check("della: one density, epsilon, key (and weight, scale) per model, two L1 sums each");
  std::vector<float> w(n), sc(n);
  for (size_t i = 0; i < n && apply; ++i) {  // the reference's float32 scalars
    w[i] = static_cast<float>(weight[i]);
    sc[i] = static_cast<float>(scale[i]);
  }
  fm::cpu::DellaParams p;
  p.row_len = row_len;
  p.density = density.data();
  p.epsilon = epsilon.data();
  p.keys = keys.data();
  p.weight = w.data();
  p.scale = sc.data();
  p.lambda = static_cast<float>(lam);
  p.elect = elect;
  p.normalize = normalize;
  if (!mask.is_none()) {
    py::buffer_info info = py::reinterpret_borrow<py::buffer>(mask).request(!apply);
    const int64_t words = static_cast<int64_t>(n) * mask_rows * ((row_len + 63) / 64);
    if (info.size * info.itemsize < words * 8 || (offset + numel) / row_len > mask_rows ||
        reinterpret_cast<uintptr_t>(info.ptr) % 8 != 0)
      check("della: the mask buffer must hold n * mask_rows * ceil(row_len / 64) aligned words");
    p.mask = static_cast<uint64_t*>(info.ptr);
    p.mask_rows = mask_rows;
    v.views.push_back(std::move(info));
  }
  void* o = apply ? const_cast<void*>(view(v, out, out_dtype, numel, "out", -1, true)) : nullptr;
  std::vector<int64_t> nonfinite(n + 1, 0);
  fm::cpu::StoredNonfinite stored;
  bool ok;
  {
    py::gil_scoped_release free_gil;
    ok = apply ? fm::cpu::della_apply(v.in, p, offset, o, out_dtype, nonfinite.data(), nthreads,
                                      &stored)
               : fm::cpu::della_reduce(v.in, p, offset, l1.data(), nonfinite.data(), nthreads);
  }
  if (!ok) throw std::bad_alloc();
  return {l1, nonfinite, {stored.count, stored.first}};
}

// Radix digit histograms of |t_i| over one chunk (csrc/cpu/histogram.cpp), added in place into
// counts (int64) and sums (float64), both [T, NUM_BINS] row-major buffers: level 0 bins the top
// 16 bits of every element, level 1 the low 16 bits of the elements whose top 16 bits equal the
// row's prefix; `targets` holds int64 [T, 2] rows (model, prefix). The chunked radix selection
// of fastmerge/planning/radix.py (CoreKernels) runs on it.
void score_histogram(const py::object& base, int base_dtype, const py::list& models,
                     const std::vector<int>& model_dtypes, const py::bytes& targets, int level,
                     int64_t numel, const py::object& counts, const py::object& sums,
                     int nthreads) {
  Views v;
  make_inputs(v, base, base_dtype, models, model_dtypes, numel);
  const std::string tg = targets;
  if (tg.size() % (2 * sizeof(int64_t)) != 0) check("targets must hold int64 [T, 2]");
  const int64_t T = static_cast<int64_t>(tg.size() / (2 * sizeof(int64_t)));
  std::vector<int64_t> rows(static_cast<size_t>(2 * T));
  memcpy(rows.data(), tg.data(), tg.size());
  check(fm::checks::histogram_args(fm::SCORE_MAGNITUDE, level, rows.data(), T, v.in.n, 0));
  py::buffer_info c = py::reinterpret_borrow<py::buffer>(counts).request(true);
  py::buffer_info s = py::reinterpret_borrow<py::buffer>(sums).request(true);
  const int64_t cells = T * fm::NUM_BINS;
  if (c.size * c.itemsize != cells * 8 || s.size * s.itemsize != cells * 8)
    check("counts and sums must be [" + std::to_string(T) + ", " + std::to_string(fm::NUM_BINS) +
          "] int64 / float64 buffers");
  bool ok;
  {
    py::gil_scoped_release free_gil;
    ok = fm::cpu::score_histogram(v.in, fm::SCORE_MAGNITUDE, rows.data(), static_cast<int>(T),
                                  level, static_cast<int64_t*>(c.ptr), static_cast<double*>(s.ptr),
                                  nthreads);
  }
  if (!ok) throw std::bad_alloc();
}

// Level 1 of |t| for rows (model, prefix) of `targets` each binning widths[r] consecutive
// prefixes, added into counts / sums of sum(widths) * NUM_BINS cells (row after row).
void score_histogram_windows(const py::object& base, int base_dtype, const py::list& models,
                             const std::vector<int>& model_dtypes, const py::bytes& targets,
                             const std::vector<int>& widths, int64_t numel,
                             const py::object& counts, const py::object& sums, int nthreads) {
  Views v;
  make_inputs(v, base, base_dtype, models, model_dtypes, numel);
  const std::string tg = targets;
  const int64_t T = static_cast<int64_t>(tg.size() / (2 * sizeof(int64_t)));
  if (tg.size() % (2 * sizeof(int64_t)) != 0 || static_cast<int64_t>(widths.size()) != T)
    check("targets must hold int64 [T, 2] and widths T values");
  std::vector<int64_t> rows(static_cast<size_t>(2 * T));
  memcpy(rows.data(), tg.data(), tg.size());
  check(fm::checks::histogram_args(fm::SCORE_MAGNITUDE, 1, rows.data(), T, v.in.n, 0));
  int64_t cells = 0;
  for (int64_t r = 0; r < T; ++r) {
    const int w = widths[static_cast<size_t>(r)];
    if (w < 1 || rows[static_cast<size_t>(2 * r + 1)] + w > fm::NUM_BINS)
      check("row " + std::to_string(r) + ": prefixes [prefix, prefix + width) must be bins");
    cells += static_cast<int64_t>(w) * fm::NUM_BINS;
  }
  py::buffer_info c = py::reinterpret_borrow<py::buffer>(counts).request(true);
  py::buffer_info s = py::reinterpret_borrow<py::buffer>(sums).request(true);
  if (c.size * c.itemsize != cells * 8 || s.size * s.itemsize != cells * 8)
    check("counts and sums must hold " + std::to_string(cells) + " int64 / float64 values");
  bool ok;
  {
    py::gil_scoped_release free_gil;
    ok = fm::cpu::score_histogram_windows(v.in, rows.data(), widths.data(), static_cast<int>(T),
                                          static_cast<int64_t*>(c.ptr), static_cast<double*>(s.ptr),
                                          nthreads);
  }
  if (!ok) throw std::bad_alloc();
}

// (count, index of the first) of the NaN/Inf values in a buffer of dtype code `dtype`: the check
// of every merged output chunk (fastmerge/output/report.py nonfinite_in)
std::tuple<int64_t, int64_t> count_nonfinite(const py::object& obj, int dtype) {
  py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
  const int64_t bytes = info.size * info.itemsize;
  const int64_t width = dtype == fm::DTYPE_FLOAT32 ? 4 : 2;
  if (dtype < fm::DTYPE_FLOAT32 || dtype > fm::DTYPE_BFLOAT16 || bytes % width != 0)
    throw py::value_error(
        "fastmerge._core: count_nonfinite: a buffer of whole values of a "
        "float dtype code");
  int64_t first = -1, count = 0;
  {
    py::gil_scoped_release free_gil;
    count = fm::cpu::count_nonfinite_values(info.ptr, bytes / width, dtype, &first);
  }
  return {count, first};
}

// The float64 Gram matrix (row-major m x m) of the vectors, or with tasks of vecs[i] - the last
// one: the pre-pass of the linear-combination methods (fastmerge/pipeline/method_pass.py)
std::vector<double> gram(const py::list& vecs, const std::vector<int>& dtypes, bool tasks,
                         int64_t numel, int nthreads) {
  const int64_t n = static_cast<int64_t>(vecs.size());
  if (n < (tasks ? 2 : 1) || n > FM_MAX_MODELS + 1)
    check("gram: 1 to " + std::to_string(FM_MAX_MODELS + 1) + " vectors (2 with tasks) needed");
  if (static_cast<int64_t>(dtypes.size()) != n) check("gram: one dtype code per vector is needed");
  Views v;
  v.views.reserve(static_cast<size_t>(n));
  std::vector<const void*> ptrs;
  for (int64_t i = 0; i < n; ++i)
    ptrs.push_back(
        view(v, vecs[static_cast<size_t>(i)], dtypes[static_cast<size_t>(i)], numel, "vecs", i));
  const int64_t m = tasks ? n - 1 : n;
  std::vector<double> out(static_cast<size_t>(m * m), 0.0);
  bool ok;
  {
    py::gil_scoped_release free_gil;
    ok = fm::cpu::gram_matrix(ptrs.data(), dtypes.data(), static_cast<int>(n), numel, tasks,
                              out.data(), nthreads);
  }
  if (!ok) throw std::bad_alloc();
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() =
      "fastmerge's CPU kernels over Python buffers, without torch (see "
      "fastmerge/pipeline/core_kernels.py)";
  m.def("fused_merge", &fused_merge);
  m.def("model_stats", &model_stats);
  m.def("topk_window", &topk_window);
  m.def("gram", &gram, "float64 Gram matrix of buffers (or of their differences to the last)");
  m.def("della", &della, "della / della_linear over a chunk of whole rows (reduce or apply)");
  m.def("score_histogram", &score_histogram,
        "level-0/1 radix histograms of |t| over a chunk, added into counts / sums");
  m.def("score_histogram_windows", &score_histogram_windows,
        "level-1 histograms of |t| for rows of several consecutive prefixes");
  m.def("isa", &fm::cpu::isa_name, "instruction set the kernels dispatch to");
  m.def("set_merge_fast_path", &fm::cpu::set_merge_fast_path,
        "whether fused_merge takes its AVX-512 block path (for tests); returns the previous");
  m.def("set_store_half_isa", &fm::cpu::set_store_half_isa,
        "float16 store conversion: 0 scalar, 1 F16C, 2 best (for tests); returns the previous");
  m.def("count_nonfinite", &count_nonfinite, "(count, first index) of a buffer's NaN/Inf values");
}
