// fastmerge CPU backend: the AVX-512 block of the L1 statistics pass (stats_avx512.cpp).
#pragma once

#include <stdint.h>

#include "fm_cpu.h"

namespace fastmerge {
namespace cpu {
namespace detail {

// Whether stats_block_fast may run for these inputs on this CPU (AVX-512 + BMI2, the merge's
// fast path switched on, no second moments).
bool stats_fast_applies(const Inputs& in);

// tot8[l] += |t| and kept8[l] += |t| of the kept elements k = l (mod 8) of model i's block
// [s0, s0 + len) (global index j0 = offset + s0; bb: the base block as float32, or null), the
// same bits as the generic block code; false, with nothing added, where this path does not
// apply (the caller then runs the generic code). scratch: kBlock floats.
bool stats_block_fast(const Inputs& in, int i, const FmModel& p, int score, const float* bb,
                      int64_t s0, uint64_t j0, int len, float* scratch, double* tot8,
                      double* kept8);

}  // namespace detail
}  // namespace cpu
}  // namespace fastmerge
