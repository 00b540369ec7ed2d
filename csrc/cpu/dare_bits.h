// fastmerge CPU backend: DARE keep bits handed from the statistics pass to the merge pass
// (no torch headers).
//
// With rescale="l1" (mergekit's `rescale: true`) a DARE merge runs two passes over a chunk,
// model_stats (the L1 of what each model keeps) and fused_merge, and both need the same
// Philox draw per element and model: ~0.4 ns each on 2 threads here, most of either pass.
// model_stats leaves its keep decisions here, 1 bit per element and model, keyed by
// everything that defines them (Philox key, keep threshold, chunk offset and size);
// fused_merge uses them instead of drawing again, then drops them. A plain memo: the merge
// gives the same bits either way, and draws them itself when an entry is missing (another
// process, an entry over the byte limit, a second merge of the same chunk).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <memory>
#include <vector>

namespace fastmerge {
namespace cpu {

struct DareBitsKey {
  uint32_t key_lo, key_hi;
  uint64_t threshold;
  int64_t offset, numel;
};

// A zeroed buffer of (numel + 63) / 64 words for the caller to fill, or null when it would
// take the memo over its byte limit. Replaces an entry of the same key.
std::shared_ptr<std::vector<uint64_t>> dare_bits_begin(const DareBitsKey& key);
// Marks the entry filled (model_stats completed).
void dare_bits_complete(const DareBitsKey& key);
// The filled entry of this key, or null (shared: it stays valid while the caller holds it).
std::shared_ptr<const std::vector<uint64_t>> dare_bits_find(const DareBitsKey& key);
void dare_bits_drop(const DareBitsKey& key);
// Sets the byte limit (0 disables and empties the cache); returns the previous one.
size_t dare_bits_limit(size_t bytes);
size_t dare_bits_bytes();

}  // namespace cpu
}  // namespace fastmerge
