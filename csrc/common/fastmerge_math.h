// fastmerge shared per-element code (umbrella header).
//
// The CPU backend (csrc/cpu, g++ -ffp-contract=off) and the CUDA backend (csrc/cuda, nvcc)
// compile the VERY SAME code from these headers: enums and packed parameters
// (fastmerge_params.h), Philox / splitmix64 / FNV-1a (fastmerge_rng.h), dtype loads/stores,
// score bits, keep decisions and the one per-element combine (fastmerge_element.h).
// Functions are marked FM_HD (= __host__ __device__ under nvcc), use no torch headers and no
// STL containers. The semantics are those of backend torch's plain-torch kernels
// (fastmerge/backends/pytorch).
#pragma once

#include "fastmerge_config.h"
#include "fastmerge_element.h"
#include "fastmerge_params.h"
#include "fastmerge_rng.h"
