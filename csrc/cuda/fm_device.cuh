// fastmerge CUDA backend: device-side building blocks shared by the kernels of csrc/cuda.
//
// Only the PARALLEL structure lives here (vector loads, grid sizing, raw-register groups); all
// per-element math (dtype conversions, task vectors, scores, keep decisions, Philox, the
// combine) comes from csrc/common/fastmerge_math.h, the very code the CPU backend executes.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "fastmerge_math.h"
#include "fm_cuda.h"
#include "fm_peel.h"

namespace fmcuda {

using namespace fastmerge;

static_assert(FM_CUDA_MAX_MODELS == FM_MAX_MODELS, "fm_cuda.h and fastmerge_config.h disagree");
static_assert(FM_CUDA_F32 == DTYPE_FLOAT32 && FM_CUDA_F16 == DTYPE_FLOAT16 &&
                  FM_CUDA_BF16 == DTYPE_BFLOAT16,
              "dtype codes of fm_cuda.h and fastmerge_params.h disagree");
static_assert(FM_CUDA_NUM_FPARAMS == NUM_FPARAMS && FM_CUDA_NUM_IPARAMS == NUM_IPARAMS &&
                  FM_CUDA_NUM_BINS == NUM_BINS,
              "packed layout of fm_cuda.h and fastmerge_params.h disagree");

constexpr int kBlock = 256;  // threads per block of every kernel

__host__ __device__ FM_FORCE_INLINE int elem_size(int dtype) {
  return dtype == DTYPE_FLOAT32 ? 4 : 2;
}

// ------------------------------------------------------------------ vector loads
// Read-only-path loads on the device; plain loads on the host, where the host harness of
// tests/test_cuda_compile.py runs the very same group code.
template <typename T>
__host__ __device__ FM_FORCE_INLINE T ldg(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// BYTES contiguous bytes at p (aligned to BYTES, or 16 for BYTES == 32) into 32-bit words.
// 2-byte loads fill the low half of w[0].
template <int BYTES>
__host__ __device__ FM_FORCE_INLINE void ld_bytes(const void* p, uint32_t* w) {
  if constexpr (BYTES == 32) {  // two 16-byte loads
    ld_bytes<16>(p, w);
    ld_bytes<16>(static_cast<const uint4*>(p) + 1, w + 4);
  } else if constexpr (BYTES == 16) {
    const uint4 a = ldg(static_cast<const uint4*>(p));
    w[0] = a.x;
    w[1] = a.y;
    w[2] = a.z;
    w[3] = a.w;
  } else if constexpr (BYTES == 8) {
    const uint2 a = ldg(static_cast<const uint2*>(p));
    w[0] = a.x;
    w[1] = a.y;
  } else if constexpr (BYTES == 4) {
    w[0] = ldg(static_cast<const unsigned int*>(p));
  } else {
    static_assert(BYTES == 2, "unsupported vector width");
    w[0] = ldg(static_cast<const unsigned short*>(p));
  }
}

// One group of EPT consecutive elements of one tensor, starting at element i0, as raw words:
// float32 element e in w[e]; 16-bit element e in half (e & 1) of w[e >> 1].
// WORDS = words of the widest dtype this instantiation accepts (EPT for float32, EPT/2 when
// every input is 16-bit). `full` (the group is inside the tensor and every pointer is aligned
// to the group's bytes) selects one vector load; otherwise element loads with bounds.
template <int EPT, int WORDS>
__host__ __device__ FM_FORCE_INLINE void load_group(const void* p, int dtype, int64_t i0,
                                                    int64_t numel, bool full,
                                                    uint32_t (&w)[WORDS]) {
  constexpr bool kAllowF32 = WORDS >= EPT;
#pragma unroll
  for (int q = 0; q < WORDS; ++q) w[q] = 0u;
  if (dtype == DTYPE_FLOAT32) {
    if constexpr (kAllowF32) {
      const float* f = static_cast<const float*>(p) + i0;
      if (full) {
        ld_bytes<EPT * 4>(f, w);
      } else {
#pragma unroll
        for (int e = 0; e < EPT; ++e)
          if (i0 + e < numel) w[e] = ldg(reinterpret_cast<const unsigned int*>(f) + e);
      }
    }
  } else {
    const unsigned short* h = static_cast<const unsigned short*>(p) + i0;
    if (full) {
      ld_bytes<EPT * 2>(h, w);
    } else {
#pragma unroll
      for (int e = 0; e < EPT; ++e)
        if (i0 + e < numel) w[e >> 1] |= static_cast<uint32_t>(ldg(h + e)) << ((e & 1) * 16);
    }
  }
}

// Element e (compile-time after unrolling) of a raw group, as float32 (shared conversions).
template <int EPT, int WORDS>
__host__ __device__ FM_FORCE_INLINE float decode(const uint32_t (&w)[WORDS], int dtype, int e) {
  constexpr bool kAllowF32 = WORDS >= EPT;
  if (kAllowF32 && dtype == DTYPE_FLOAT32) return fm_u2f(w[e < WORDS ? e : WORDS - 1]);
  const uint16_t h =
      static_cast<uint16_t>(w[(e >> 1) < WORDS ? (e >> 1) : WORDS - 1] >> ((e & 1) * 16));
  return dtype == DTYPE_BFLOAT16 ? fm_bf16_to_float(h) : fm_half_to_float(h);
}

// ------------------------------------------------------------------ element queues
// The merge kernel walks a group's elements in a NOT unrolled loop (one copy of the shared
// per-element code per kernel instead of EPT): each input group is a little-endian bit queue
// in registers, and take_front() pops its first element, shifting the queue down by one
// element (16 or 32 bits). Only constant indices touch the arrays, so they stay in registers.
__host__ __device__ FM_FORCE_INLINE uint32_t fshr16(uint32_t lo, uint32_t hi) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, 16);
#else
  return (lo >> 16) | (hi << 16);
#endif
}

template <int EPT, int WORDS>
__host__ __device__ FM_FORCE_INLINE float take_front(uint32_t (&w)[WORDS], int dtype) {
  constexpr bool kAllowF32 = WORDS >= EPT;
  if (kAllowF32 && dtype == DTYPE_FLOAT32) {
    const float x = fm_u2f(w[0]);
#pragma unroll
    for (int q = 0; q + 1 < WORDS; ++q) w[q] = w[q + 1];
    w[WORDS - 1] = 0u;
    return x;
  }
  const uint16_t h = static_cast<uint16_t>(w[0] & 0xFFFFu);
#pragma unroll
  for (int q = 0; q + 1 < WORDS; ++q) w[q] = fshr16(w[q], w[q + 1]);
  w[WORDS - 1] >>= 16;
  return dtype == DTYPE_BFLOAT16 ? fm_bf16_to_float(h) : fm_half_to_float(h);
}

// Output queue of EPT elements: push_back() appends at the top and shifts the queue down, so
// after EPT pushes element e sits where a vector load would have put it (float32: o[e];
// 16-bit: half (e & 1) of o[e >> 1]).
template <int EPT>
__host__ __device__ FM_FORCE_INLINE void push_back(uint32_t (&o)[EPT], int dtype, float x) {
  if (dtype == DTYPE_FLOAT32) {
#pragma unroll
    for (int q = 0; q + 1 < EPT; ++q) o[q] = o[q + 1];
    o[EPT - 1] = fm_f2u(x);
    return;
  }
  const uint32_t h = dtype == DTYPE_BFLOAT16 ? fm_float_to_bf16(x) : fm_float_to_half(x);
  constexpr int kW = EPT >= 2 ? EPT / 2 : 1;
  if constexpr (EPT == 1) {
    o[0] = h;
  } else {
#pragma unroll
    for (int q = 0; q + 1 < kW; ++q) o[q] = fshr16(o[q], o[q + 1]);
    o[kW - 1] = (o[kW - 1] >> 16) | (h << 16);
  }
}

// Store a full output queue (vectorised when `full`, element by element otherwise).
template <int EPT>
__host__ __device__ FM_FORCE_INLINE void store_queue(void* out, int dtype, int64_t i0,
                                                     int64_t numel, bool full,
                                                     const uint32_t (&o)[EPT]) {
  if (dtype == DTYPE_FLOAT32) {
    uint32_t* p = static_cast<uint32_t*>(out) + i0;
    if (full) {
      if constexpr (EPT % 4 == 0) {
#pragma unroll
        for (int q = 0; q < EPT / 4; ++q)
          reinterpret_cast<uint4*>(p)[q] =
              make_uint4(o[4 * q], o[4 * q + 1], o[4 * q + 2], o[4 * q + 3]);
      } else if constexpr (EPT == 2) {
        reinterpret_cast<uint2*>(p)[0] = make_uint2(o[0], o[1]);
      } else {
        p[0] = o[0];
      }
    } else {
#pragma unroll
      for (int e = 0; e < EPT; ++e)
        if (i0 + e < numel) p[e] = o[e];
    }
    return;
  }
  unsigned short* p = static_cast<unsigned short*>(out) + i0;
  if (full) {
    if constexpr (EPT == 8) {
      reinterpret_cast<uint4*>(p)[0] = make_uint4(o[0], o[1], o[2], o[3]);
    } else if constexpr (EPT == 4) {
      reinterpret_cast<uint2*>(p)[0] = make_uint2(o[0], o[1]);
    } else if constexpr (EPT == 2) {
      reinterpret_cast<unsigned int*>(p)[0] = o[0];
    } else {
      p[0] = static_cast<unsigned short>(o[0]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < EPT; ++e)
      if (i0 + e < numel)
        p[e] = static_cast<unsigned short>(o[EPT >= 2 ? (e >> 1) : 0] >> ((e & 1) * 16));
  }
}

// ------------------------------------------------------------------ host helpers
// The tensors a launch reads (base, models, second moments when present) and, when given,
// `out`, as spans for fm_peel.h; returns how many.
inline int launch_spans(const FmCudaInputs& in, const void* out, int out_dtype,
                        fmpeel::Span (&spans)[2 * FM_MAX_MODELS + 2]) {
  int c = 0;
  spans[c++] = {in.base, elem_size(in.base_dtype)};
  for (int i = 0; i < in.n_models; ++i) {
    spans[c++] = {in.models[i], elem_size(in.model_dtype[i])};
    if (in.has_moments) spans[c++] = {in.moments[i], elem_size(in.moment_dtype[i])};
  }
  if (out != nullptr) spans[c++] = {out, elem_size(out_dtype)};
  return c;
}

// Every pointer aligned to its group's vector width (so that every full group is one vector
// load); `out` likewise when given.
inline bool inputs_aligned(const FmCudaInputs& in, int ept, const void* out, int out_dtype) {
  fmpeel::Span spans[2 * FM_MAX_MODELS + 2];
  return fmpeel::peel_head(spans, launch_spans(in, out, out_dtype, spans), ept) == 0;
}

// Head / body plan of a call (fm_peel.h): every pointer misaligned by the same element count
// gets a head of element loads and a vector-loaded body.
inline fmpeel::Plan peel_plan(const FmCudaInputs& in, int ept, const void* out, int out_dtype) {
  fmpeel::Span spans[2 * FM_MAX_MODELS + 2];
  return fmpeel::plan(spans, launch_spans(in, out, out_dtype, spans), ept, in.numel);
}

inline const void* advance(const void* p, int dtype, int64_t by) {
  return p == nullptr ? nullptr : static_cast<const char*>(p) + by * elem_size(dtype);
}

// Elements [start, start + count) of every tensor of a call, as a call of their own.
inline FmCudaInputs slice_inputs(const FmCudaInputs& in, int64_t start, int64_t count) {
  FmCudaInputs r = in;
  r.numel = count;
  r.base = advance(in.base, in.base_dtype, start);
  for (int i = 0; i < in.n_models; ++i) {
    r.models[i] = advance(in.models[i], in.model_dtype[i], start);
    r.moments[i] = advance(in.moments[i], in.moment_dtype[i], start);
  }
  return r;
}

// Runs `launch(part, start, vec_ok)` over the launches of one call (peel_plan): the head
// [0, h) with element loads when h > 0, then the body [h, numel), whose element indices
// (DARE's Philox counter, the output) the callee shifts by `start`.
template <typename Launch>
inline cudaError_t launch_peeled(const FmCudaInputs& in, int ept, const void* out, int out_dtype,
                                 Launch&& launch) {
  const fmpeel::Plan plan = peel_plan(in, ept, out, out_dtype);
  if (plan.head > 0) {
    const cudaError_t err = launch(slice_inputs(in, 0, plan.head), int64_t{0}, false);
    if (err != cudaSuccess) return err;
  }
  return launch(slice_inputs(in, plan.head, in.numel - plan.head), plan.head, plan.vec_ok);
}

inline bool all_16bit(const FmCudaInputs& in) {
  if (in.base != nullptr && in.base_dtype == DTYPE_FLOAT32) return false;
  for (int i = 0; i < in.n_models; ++i) {
    if (in.model_dtype[i] == DTYPE_FLOAT32) return false;
    if (in.has_moments && in.moment_dtype[i] == DTYPE_FLOAT32) return false;
  }
  return true;
}

// Streaming multiprocessors of the current device (cached per device).
inline int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  int sms = 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms < 1)
    sms = 1;
  if (dev >= 0 && dev < 64) cached[dev] = sms;
  return sms;
}

// Grid of a grid-stride kernel: enough blocks to fill the device `waves` times over (from the
// kernel's occupancy), never more than there is work for.
template <typename Kernel>
inline unsigned int grid_for(Kernel kernel, int64_t work_items, int block, size_t smem = 0) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, smem) != cudaSuccess ||
      per_sm < 1)
    per_sm = 1;
  const int64_t cap = static_cast<int64_t>(per_sm) * sm_count() * 2;
  int64_t need = (work_items + block - 1) / block;
  if (need < 1) need = 1;
  return static_cast<unsigned int>(need < cap ? need : cap);
}

}  // namespace fmcuda
