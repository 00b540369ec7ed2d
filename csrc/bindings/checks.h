// The argument checks of the CPU kernels, once, without torch: both bindings (torch_cpu.cpp for
// fastmerge._C, core.cpp for fastmerge._core) describe their arguments by counts, sizes and the
// dtype codes of fastmerge_params.h and call these. Each check returns the error message, or
// an empty string when the arguments are fine; the binding raises it its own way (TORCH_CHECK:
// RuntimeError; pybind11: ValueError) behind its own prefix.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "fm_cpu.h"

namespace fastmerge {
namespace checks {

// "what" or "what[i]" (i < 0: no index)
inline std::string name(const char* what, int64_t i) {
  return i < 0 ? std::string(what) : std::string(what) + "[" + std::to_string(i) + "]";
}

// bytes per element of a dtype code, 0 for an unknown code
inline int64_t itemsize(int dtype) {
  switch (dtype) {
    case DTYPE_FLOAT32: return 4;
    case DTYPE_FLOAT16:
    case DTYPE_BFLOAT16: return 2;
    default: return 0;
  }
}

inline std::string dtype(int code, const char* what, int64_t i) {
  if (itemsize(code) != 0) return {};
  return name(what, i) + " has an unknown dtype code " + std::to_string(code) +
         "; supported: bfloat16, float16, float32";
}

// n models (the FM_MAX_MODELS cap) and m second moments (none or one per model)
inline std::string models(int64_t n, int64_t m) {
  const char* err = fm_check_models(static_cast<int>(n > 1000 ? 1000 : n));
  if (err != nullptr) {
    const std::string msg(err), prefix("fastmerge: ");  // the bindings add their own prefix
    return (msg.compare(0, prefix.size(), prefix) == 0 ? msg.substr(prefix.size()) : msg) +
           " (got " + std::to_string(n) + " models)";
  }
  if (m != 0 && m != n)
    return "second_moments must be empty or one per model (" + std::to_string(n) + "), got " +
           std::to_string(m);
  return {};
}

// a tensor input of `have` elements where the chunk has `numel`
inline std::string elements(const char* what, int64_t i, int64_t have, int64_t numel) {
  if (have == numel) return {};
  return name(what, i) + " has " + std::to_string(have) + " elements, models[0] has " +
         std::to_string(numel);
}

// a buffer of `have` bytes that must hold numel elements of dtype code `dtype`
inline std::string bytes(const char* what, int64_t i, int64_t have, int64_t numel, int dtype) {
  std::string err = checks::dtype(dtype, what, i);
  if (!err.empty()) return err;
  const int64_t need = numel * itemsize(dtype);
  if (have >= need) return {};
  return name(what, i) + " holds " + std::to_string(have) + " bytes, " + std::to_string(need) +
         " are needed";
}

// the parameter rows: fparams float32 [n, NUM_FPARAMS], iparams int64 [n, NUM_IPARAMS]
// (rows/cols of each; -1 where the argument is not a matrix)
inline std::string param_rows(int64_t f_rows, int64_t f_cols, int64_t i_rows, int64_t i_cols,
                              int64_t n) {
  if (f_rows == n && f_cols == NUM_FPARAMS && i_rows == n && i_cols == NUM_IPARAMS) return {};
  return "fparams / iparams must be float32 [" + std::to_string(n) + ", " +
         std::to_string(NUM_FPARAMS) + "] / int64 [" + std::to_string(n) + ", " +
         std::to_string(NUM_IPARAMS) + "], got [" + std::to_string(f_rows) + ", " +
         std::to_string(f_cols) + "] / [" + std::to_string(i_rows) + ", " + std::to_string(i_cols) +
         "]";
}

// Unpacks n parameter rows into `out` (resized to n); checks each keep mode.
inline std::string unpack_models(const float* f, const int64_t* ip, int64_t n,
                                 std::vector<FmModel>& out) {
  out.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out[static_cast<size_t>(i)] = fm_unpack_model(f + i * NUM_FPARAMS, ip + i * NUM_IPARAMS);
    const int mode = out[static_cast<size_t>(i)].mode;
    if (mode < MODE_KEEP_ALL || mode > MODE_DARE)
      return "unknown keep mode " + std::to_string(mode) + " for model " + std::to_string(i);
  }
  return {};
}

// the fisher score of a band model and the ota combine read the second moments
inline std::string moments_needed(int64_t combine, int64_t score, const std::vector<FmModel>& ms,
                                  bool has_moments) {
  if (has_moments) return {};
  if (combine == COMBINE_OTA) return "the ota combine needs one second-moment tensor per model";
  if (score == SCORE_FISHER)
    for (const FmModel& m : ms)
      if (m.mode == MODE_BAND) return "the fisher score needs one second-moment tensor per model";
  return {};
}

// fused_merge's enumerations
inline std::string merge_enums(int64_t combine, int64_t score, int64_t elect, int64_t elect_on,
                               int64_t normalize) {
  if (combine < 0 || combine >= NUM_COMBINES) return "unknown combine " + std::to_string(combine);
  if (score != SCORE_MAGNITUDE && score != SCORE_FISHER)
    return "unknown score " + std::to_string(score);
  if (elect != ELECT_SUM && elect != ELECT_COUNT)
    return "unknown election " + std::to_string(elect);
  if (elect_on != ELECT_WEIGHTED && elect_on != ELECT_UNWEIGHTED)
    return "unknown elect_on " + std::to_string(elect_on);
  if (normalize < NORMALIZE_NONE || normalize > NORMALIZE_COUNT)
    return "unknown normalize " + std::to_string(normalize);
  return {};
}

// score_histogram: the score, the level and the T (model, prefix) target rows
inline std::string histogram_args(int64_t score, int64_t level, const int64_t* targets, int64_t T,
                                  int64_t n, int64_t n_moments) {
  if (score != SCORE_MAGNITUDE && score != SCORE_FISHER)
    return "unknown score " + std::to_string(score);
  if (level != 0 && level != 1) return "level must be 0 or 1, got " + std::to_string(level);
  if (score == SCORE_FISHER && n_moments != n)
    return "the fisher score needs one second-moment tensor per model";
  for (int64_t r = 0; r < T; ++r) {
    if (targets[2 * r] < 0 || targets[2 * r] >= n)
      return "target row " + std::to_string(r) + " names model " + std::to_string(targets[2 * r]) +
             " of " + std::to_string(n);
    if (targets[2 * r + 1] < 0 || targets[2 * r + 1] >= NUM_BINS)
      return "target row " + std::to_string(r) + " has prefix " +
             std::to_string(targets[2 * r + 1]);
  }
  return {};
}

// topk_window: R (model, k) request rows, read into model[] / k[]
inline std::string requests(const int64_t* rows, int64_t R, int64_t n, int64_t numel,
                            std::vector<int64_t>& model, std::vector<int64_t>& k) {
  model.resize(static_cast<size_t>(R));
  k.resize(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t m = rows[2 * r], kr = rows[2 * r + 1];
    model[static_cast<size_t>(r)] = m;
    k[static_cast<size_t>(r)] = kr;
    if (m < 0 || m >= n)
      return "request " + std::to_string(r) + " names model " + std::to_string(m) + " of " +
             std::to_string(n);
    if (kr < 1 || kr > numel)
      return "request " + std::to_string(r) + " has k = " + std::to_string(kr) +
             "; need 1 <= k <= " + std::to_string(numel);
  }
  return {};
}

}  // namespace checks
}  // namespace fastmerge
