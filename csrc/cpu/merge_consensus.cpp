// fastmerge CPU backend: fused-merge instances for the consensus_sum and consensus_ties combine(s)
// (see merge_impl.h).
#include "merge_impl.h"

namespace fastmerge::cpu::detail {

void merge_range_consensus(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf,
                           StoredNonfinite* st, bool* done) {
  merge_range_either<COMBINE_CONSENSUS_SUM, COMBINE_CONSENSUS_TIES>(ctx, b, e, nf, st, done);
}

}  // namespace fastmerge::cpu::detail
