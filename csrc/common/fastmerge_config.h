// fastmerge shared per-element code: configuration and exact float32 helpers.
//
// The CPU backend (csrc/cpu, g++) and the CUDA backend (csrc/cuda, nvcc) compile the VERY SAME
// code from csrc/common/*.h: every function here is `FM_HD inline`, plain C++17, with no torch
// headers, no STL containers and no exceptions, so it is usable in __device__ code.
//
// Float32 arithmetic that decides masks (task vectors, scores, rescaled values, consensus
// comparisons) must round every operation exactly as torch's float32 kernels do: no FMA
// contraction. The host build uses -ffp-contract=off; on the device the fm_* helpers below use
// the explicitly rounded intrinsics (__fmul_rn, __fadd_rn, ...), which nvcc never contracts.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__
#else
#define FM_HD
#endif

#if defined(__CUDACC__)
#define FM_FORCE_INLINE __forceinline__
#elif defined(__GNUC__)
#define FM_FORCE_INLINE inline __attribute__((always_inline))
#else
#define FM_FORCE_INLINE inline
#endif

// Models merged per element: per-element local arrays are sized by this cap, and keep masks of
// one element fit in one uint32. Kernels reject N > FM_MAX_MODELS with a clear error
// (fm_check_models below gives the message); merge more models hierarchically.
#ifndef FM_MAX_MODELS
#define FM_MAX_MODELS 32
#endif

namespace fastmerge {

constexpr int kMaxModels = FM_MAX_MODELS;
static_assert(FM_MAX_MODELS >= 1 && FM_MAX_MODELS <= 32, "keep masks are uint32 bit sets");

// ------------------------------------------------------------------ bit casts
FM_HD FM_FORCE_INLINE uint32_t fm_f2u(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FM_HD FM_FORCE_INLINE float fm_u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// ------------------------------------------------------------------ exactly rounded float32 ops
FM_HD FM_FORCE_INLINE float fm_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FM_HD FM_FORCE_INLINE float fm_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

FM_HD FM_FORCE_INLINE float fm_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FM_HD FM_FORCE_INLINE float fm_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

FM_HD FM_FORCE_INLINE float fm_abs(float x) { return fm_u2f(fm_f2u(x) & 0x7FFFFFFFu); }

// finite iff the exponent field is not all ones
FM_HD FM_FORCE_INLINE bool fm_isfinite(float x) { return (fm_f2u(x) & 0x7F800000u) != 0x7F800000u; }

FM_HD FM_FORCE_INLINE float fm_inf() { return fm_u2f(0x7F800000u); }

// torch.sign: -1, 0 (for +-0) or +1; NaN stays NaN (never equal to an elected sign)
FM_HD FM_FORCE_INLINE float fm_sign(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == 0.0f ? 0.0f : x));
}

// x ** p as torch's float32 pow with a scalar exponent: the exponents torch special-cases
// (0.5 -> sqrt, 1, 2 -> x*x, 3, -0.5, -1, -2) take the same exact paths, others powf.
FM_HD inline float fm_pow(float x, float p) {
  if (p == 0.5f) return sqrtf(x);
  if (p == 1.0f) return x;
  if (p == 2.0f) return fm_mul(x, x);
  if (p == 3.0f) return fm_mul(fm_mul(x, x), x);
  if (p == -0.5f) return fm_div(1.0f, sqrtf(x));
  if (p == -1.0f) return fm_div(1.0f, x);
  if (p == -2.0f) return fm_div(1.0f, fm_mul(x, x));
  if (p == 0.0f) return 1.0f;
  return powf(x, p);
}

}  // namespace fastmerge
