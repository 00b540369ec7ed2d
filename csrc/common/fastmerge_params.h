// fastmerge shared code: enumerations and the packed per-model parameter layout.
// The one definition of the kernel ABI: fastmerge/abi.py is generated from this file
// (scripts/gen_abi.py; tests/test_abi.py fails on drift).
// Compiled by the CPU backend (g++) and the CUDA backend (nvcc) alike.
#pragma once

#include "fastmerge_config.h"

namespace fastmerge {

// keep modes of iparams[:, I_MODE]
constexpr int MODE_KEEP_ALL = 0;
constexpr int MODE_BAND = 1;
constexpr int MODE_KEEP_NONE = 2;
constexpr int MODE_DARE = 3;

// selection score
constexpr int SCORE_MAGNITUDE = 0;  // |t|
constexpr int SCORE_FISHER = 1;     // (t * t) * v

// combine ids = index in fastmerge.methods.COMBINES
constexpr int COMBINE_LINEAR = 0;
constexpr int COMBINE_SUM = 1;
constexpr int COMBINE_TIES = 2;
constexpr int COMBINE_CONSENSUS_SUM = 3;
constexpr int COMBINE_CONSENSUS_TIES = 4;
constexpr int COMBINE_OTA = 5;
constexpr int NUM_COMBINES = 6;

constexpr int ELECT_SUM = 0;
constexpr int ELECT_COUNT = 1;
constexpr int ELECT_WEIGHTED = 0;
constexpr int ELECT_UNWEIGHTED = 1;

constexpr int NORMALIZE_NONE = 0;
constexpr int NORMALIZE_WEIGHTS = 1;
constexpr int NORMALIZE_COUNT = 2;

// fparams float32 [N, NUM_FPARAMS] columns
constexpr int F_WEIGHT = 0;
constexpr int F_RESCALE = 1;
constexpr int F_LO = 2;
constexpr int F_HI = 3;
constexpr int F_CONSENSUS_LAMBDA = 4;
constexpr int F_OTA_SCALE = 5;
constexpr int NUM_FPARAMS = 6;

// iparams int64 [N, NUM_IPARAMS] columns
constexpr int I_MODE = 0;
constexpr int I_DARE_KEY = 1;        // the 64-bit Philox key, stored as int64 bits
constexpr int I_DARE_THRESHOLD = 2;  // keep iff the DARE word < threshold (0 .. 2^32)
constexpr int NUM_IPARAMS = 3;

// radix selection: 16-bit digits of the 31-bit score pattern
constexpr int RADIX_BITS = 16;
constexpr int NUM_BINS = 1 << RADIX_BITS;
constexpr int NONFINITE_BIN = 0x7F80;  // level-0 bins >= this hold Inf/NaN scores

// element dtype codes of the kernels' raw-pointer interface (not a torch enum)
constexpr int DTYPE_FLOAT32 = 0;
constexpr int DTYPE_FLOAT16 = 1;
constexpr int DTYPE_BFLOAT16 = 2;

// One model's parameters, unpacked once from its fparams/iparams rows.
struct FmModel {
  float weight;
  float rescale;
  float lo;
  float hi;
  float consensus_lambda;
  float ota_scale;
  int32_t mode;
  uint32_t key_lo;
  uint32_t key_hi;
  uint64_t dare_threshold;
};

FM_HD inline FmModel fm_unpack_model(const float* frow, const int64_t* irow) {
  FmModel m;
  m.weight = frow[F_WEIGHT];
  m.rescale = frow[F_RESCALE];
  m.lo = frow[F_LO];
  m.hi = frow[F_HI];
  m.consensus_lambda = frow[F_CONSENSUS_LAMBDA];
  m.ota_scale = frow[F_OTA_SCALE];
  m.mode = static_cast<int32_t>(irow[I_MODE]);
  const uint64_t key = static_cast<uint64_t>(irow[I_DARE_KEY]);
  m.key_lo = static_cast<uint32_t>(key & 0xFFFFFFFFull);
  m.key_hi = static_cast<uint32_t>(key >> 32);
  const int64_t thr = irow[I_DARE_THRESHOLD];
  m.dare_threshold = thr <= 0 ? 0ull : static_cast<uint64_t>(thr);
  return m;
}

// The scalar arguments of fused_merge, plus the float32 sum of all weights (the divisor of the
// sum / linear combines with normalize), computed once by fm_make_config.
struct FmMergeConfig {
  int n;
  int combine;
  int score;
  int elect;
  int elect_on;
  int normalize;
  int consensus_k;
  float scale;
  float power;
  float eps;
  float sum_weights;
  int v_is_power;  // 1: the v[] given to fm_combine already hold fm_ota_power(v, power)
};

FM_HD inline FmMergeConfig fm_make_config(int n, const FmModel* models, int combine, int score,
                                          int elect, int elect_on, int normalize, int consensus_k,
                                          float scale, float power, float eps) {
  FmMergeConfig c;
  c.n = n;
  c.combine = combine;
  c.score = score;
  c.elect = elect;
  c.elect_on = elect_on;
  c.normalize = normalize;
  c.consensus_k = consensus_k;
  c.scale = scale;
  c.power = power;
  c.eps = eps;
  float sw = 0.0f;
  for (int i = 0; i < n; ++i) sw = fm_add(sw, models[i].weight);
  c.sum_weights = sw;
  c.v_is_power = 0;
  return c;
}

// Host-side validation message of the per-element cap (nullptr when fine).
inline const char* fm_check_models(int n) {
  if (n < 1) return "fastmerge: at least one model is needed";
  if (n > FM_MAX_MODELS)
    return "fastmerge: more models than FM_MAX_MODELS (32) in one fused merge; merge in groups "
           "(e.g. task_arithmetic of partial sums) or rebuild with a larger FM_MAX_MODELS";
  return nullptr;
}

}  // namespace fastmerge
