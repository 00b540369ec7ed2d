// fastmerge CPU backend: fused-merge instances for the linear and sum combine(s) (see
// merge_impl.h).
#include "merge_impl.h"

namespace fastmerge::cpu::detail {

void merge_range_linear_sum(const MergeCtx& ctx, int64_t b, int64_t e, int64_t* nf,
                            StoredNonfinite* st, bool* done) {
  merge_range_either<COMBINE_LINEAR, COMBINE_SUM>(ctx, b, e, nf, st, done);
}

}  // namespace fastmerge::cpu::detail
