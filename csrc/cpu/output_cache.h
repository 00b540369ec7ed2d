// fastmerge CPU backend: a small cache of freed output buffers (no torch headers).
//
// A fresh multi-MiB buffer costs its page faults on first touch: measured here (AMD EPYC VM,
// 2 threads) a 32 MiB bf16 output took ~10 ms to fault in, against ~15 ms for the whole
// fused merge pass of 4096x4096 x 3 models that writes it. Merges produce the same output
// sizes over and over (every layer has the same shapes), so fused_merge takes its output from
// here and the tensor's deleter gives the buffer back. Buffers smaller than 1 MiB go through
// the normal allocator. The cache holds at most `limit` bytes (default 256 MiB; the engine
// sets one output chunk and counts it in its memory budget) and at most 2 buffers.
#pragma once

#include <stddef.h>

namespace fastmerge {
namespace cpu {

// A 64-byte aligned buffer of exactly `bytes` (a cached one of that size if there is one), or
// nullptr when `bytes` is below the cache's minimum or memory is exhausted.
void* output_acquire(size_t bytes);
// Back to the cache, or freed if it does not fit.
void output_release(void* p, size_t bytes);
// Sets the byte limit, frees what no longer fits; returns the previous limit.
size_t output_cache_limit(size_t bytes);
// Bytes currently cached (for tests).
size_t output_cache_bytes();

}  // namespace cpu
}  // namespace fastmerge
