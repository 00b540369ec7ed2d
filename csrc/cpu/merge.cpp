// fastmerge CPU backend: the fused merge pass (fused_merge) and the statistics pass
// (model_stats).
//
// fused_merge reads base + N models (+ N second moments) once and writes the output once. Per
// block of kBlock elements: inputs -> float32 task vectors (counting non-finite values), then
// per model the sparsified values s_i = (t_i * keep_i) * rescale_i with the keep mode hoisted
// out of the element loop (fm_keep_mode<MODE>), then the shared per-element combine
// fm_combine() (csrc/common/fastmerge_element.h, the same code the CUDA backend runs) with the
// combine id and N fixed at compile time so the element loop unrolls over the models and
// vectorises across elements, and finally one rounding loop to the output dtype.
#include <omp.h>
#include <stdlib.h>

#include <atomic>
#include <memory>
#include <vector>

#include "merge_impl.h"
#include "stats_avx512.h"

namespace fastmerge {
namespace cpu {
namespace {
std::atomic<bool> g_merge_fast_path{true};
}  // namespace

bool merge_fast_path_enabled() { return g_merge_fast_path.load(std::memory_order_relaxed); }
bool set_merge_fast_path(bool on) { return g_merge_fast_path.exchange(on); }

namespace {

using detail::MergeCtx;

void merge_range(const MergeCtx& ctx, int64_t begin, int64_t end, int64_t* nonfinite,
                 StoredNonfinite* stored, bool* done) {
  switch (ctx.cfg.combine) {
    case COMBINE_LINEAR:
    case COMBINE_SUM:
      detail::merge_range_linear_sum(ctx, begin, end, nonfinite, stored, done);
      break;
    case COMBINE_TIES:
    case COMBINE_OTA: detail::merge_range_ties_ota(ctx, begin, end, nonfinite, stored, done); break;
    default: detail::merge_range_consensus(ctx, begin, end, nonfinite, stored, done); break;
  }
}

// ------------------------------------------------------------------ model_stats
struct StatsCtx {
  const Inputs* in;
  int score;
  const FmModel* models;
  float power;
  int64_t offset;
};

// acc += (sum |t|, sum |s|) over a block, in 8 independent float64 lanes: a single running
// double sum is a serial chain of 4-cycle adds that also blocks vectorisation (no reassociation
// without -ffast-math). |s| = |t| where kept and 0 elsewhere (s = sparsify(t, keep, 1)).
FM_FORCE_INLINE void l1_sums(const float* __restrict t, const float* __restrict s, int len,
                             double* __restrict tot, double* __restrict kept) {
  int k = 0;
  for (; k + 8 <= len; k += 8) {
    for (int l = 0; l < 8; ++l) {
      tot[l] += static_cast<double>(fm_abs(t[k + l]));
      kept[l] += static_cast<double>(fm_abs(s[k + l]));
    }
  }
  for (; k < len; ++k) {
    tot[0] += static_cast<double>(fm_abs(t[k]));
    kept[0] += static_cast<double>(fm_abs(s[k]));
  }
}

// The keep decisions come from detail::sparsify_model, the vectorised per-block code of the
// merge pass (Philox DARE masks included), with the rescale left out. Measured here (AMD EPYC,
// 1 thread, 4096x4096 bf16, N = 3, DARE): 15.8 ns per element and model with a scalar
// per-element keep and one running double sum each, ~1 ns this way.
FM_CPU_CLONES
void stats_range(const StatsCtx& c, int64_t begin, int64_t end, double* acc) {
  const Inputs& in = *c.in;
  const bool has_base = in.base != nullptr;
  alignas(64) float bb[kBlock];
  alignas(64) float tt[kBlock];
  alignas(64) float ss[kBlock];
  alignas(64) float vv[kBlock];
  alignas(64) double tot[FM_MAX_MODELS][8] = {};
  alignas(64) double kept[FM_MAX_MODELS][8] = {};
  FmModel models[FM_MAX_MODELS];
  for (int i = 0; i < in.n; ++i) {
    models[i] = c.models[i];
    models[i].rescale = 1.0f;
  }
  // the AVX-512 block (stats_avx512.cpp: the merge's fused DARE Philox, the same sums) where
  // it applies, block by block and model by model, else the code below
  const bool fast = detail::stats_fast_applies(in);
  for (int64_t s0 = begin; s0 < end; s0 += kBlock) {
    const int len = static_cast<int>(end - s0 < kBlock ? end - s0 : kBlock);
    const uint64_t j0 = static_cast<uint64_t>(c.offset + s0);
    if (has_base) load_block(in.base, in.base_dtype, s0, len, bb);
    for (int i = 0; i < in.n; ++i) {
      if (fast && detail::stats_block_fast(in, i, models[i], c.score, has_base ? bb : nullptr, s0,
                                           j0, len, tt, tot[i], kept[i]))
        continue;
      load_task_block(in.models[i], in.model_dtypes[i], s0, len, bb, has_base, tt);
      const float* v = nullptr;
      if (in.has_moments) {
        load_block(in.moments[i], in.moment_dtypes[i], s0, len, vv);
        v = vv;
        double p = 0.0;
        for (int k = 0; k < len; ++k)
          p += static_cast<double>(fm_pow(vv[k] > 0.0f ? vv[k] : 0.0f, c.power));
        acc[3 * i + 2] += p;
      }
      detail::sparsify_model(models[i], tt, v, c.score, j0, len, ss);
      l1_sums(tt, ss, len, tot[i], kept[i]);
    }
  }
  for (int i = 0; i < in.n; ++i) {
    double t = 0.0, k = 0.0;
    for (int l = 0; l < 8; ++l) {
      t += tot[i][l];
      k += kept[i][l];
    }
    acc[3 * i] += t;
    acc[3 * i + 1] += k;
  }
}

}  // namespace

bool fused_merge(const Inputs& in, const FmMergeConfig& cfg, const FmModel* models, int64_t offset,
                 void* out, int out_dtype, int64_t* nonfinite, int nthreads,
                 StoredNonfinite* stored) {
  if (in.numel == 0) return true;
  bool need_v = false;
  if (cfg.combine != COMBINE_LINEAR && in.has_moments) {
    need_v = cfg.combine == COMBINE_OTA;
    for (int i = 0; i < in.n; ++i)
      need_v = need_v || (cfg.score == SCORE_FISHER && models[i].mode == MODE_BAND);
  }
  // DARE masks are drawn block by block in each pass that needs them (rescale="l1": the
  // statistics pass and the merge both draw): with semantics v2's one Philox call per four
  // elements drawing again costs less than keeping the bits between the passes, and the merge
  // keeps the AVX-512 block path (benchmarks/results/dare.md).
  MergeCtx ctx{&in, cfg, models, offset, out, out_dtype, need_v};
  const int nt = effective_threads(in.numel, nthreads, int64_t{1} << 15);
  // per-thread non-finite counts and failure flags (no atomics). The range is cut into chunks
  // of kChunk elements handed out dynamically, so a thread that the OS preempts (a shared
  // machine) does not hold the others up; the result does not depend on the split.
  int64_t nf[64 * FM_MAX_MODELS];
  StoredNonfinite written[64];
  bool failed[64];
  const int threads = nt < 64 ? nt : 64;
  for (int q = 0; q < 64 * FM_MAX_MODELS; ++q) nf[q] = 0;
  for (int q = 0; q < 64; ++q) failed[q] = false;
  const int64_t chunks = (in.numel + kChunk - 1) / kChunk;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    int64_t* mine = nf + static_cast<size_t>(tid) * FM_MAX_MODELS;
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < chunks; ++q) {
      const int64_t begin = q * kChunk;
      const int64_t end = in.numel - begin > kChunk ? begin + kChunk : in.numel;
      bool done = false;
      merge_range(ctx, begin, end, mine, &written[tid], &done);
      if (!done) failed[tid] = true;
    }
  }
  bool ok = true;
  for (int t = 0; t < 64; ++t) ok = ok && !failed[t];
  for (int t = 0; t < threads; ++t) {
    for (int i = 0; i < in.n; ++i) nonfinite[i] += nf[static_cast<size_t>(t) * FM_MAX_MODELS + i];
    if (stored != nullptr) stored->add(written[t].count, written[t].first);
  }
  return ok;
}

void model_stats(const Inputs& in, int score, const FmModel* models, float power, int64_t offset,
                 double* out, int nthreads) {
  if (in.numel == 0) return;
  StatsCtx c{&in, score, models, power, offset};
  const int nt = effective_threads(in.numel, nthreads, int64_t{1} << 15);
  // Dynamic work items of kChunk elements, as in fused_merge (a thread the OS preempts holds
  // up one item, not half the tensor), each summed into its own slot; the slots are added in
  // item order, so the sums do not depend on the thread count or the schedule.
  const int64_t items = (in.numel + kChunk - 1) / kChunk;
  const size_t per = 3 * static_cast<size_t>(in.n);
  double* acc = static_cast<double*>(calloc(static_cast<size_t>(items) * per, sizeof(double)));
  if (acc == nullptr) {  // no memory for the slots: one thread, one slot
    double one[3 * FM_MAX_MODELS] = {};
    stats_range(c, 0, in.numel, one);
    for (size_t q = 0; q < per; ++q) out[q] += one[q];
  } else {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t q = 0; q < items; ++q) {
      const int64_t begin = q * kChunk;
      const int64_t end = in.numel - begin > kChunk ? begin + kChunk : in.numel;
      stats_range(c, begin, end, acc + static_cast<size_t>(q) * per);
    }
    for (int64_t q = 0; q < items; ++q)
      for (size_t j = 0; j < per; ++j) out[j] += acc[static_cast<size_t>(q) * per + j];
    free(acc);
  }
}

const char* isa_name() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTMERGE_NO_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2)";
  return "x86-64 baseline";
#else
  return "compiler default";
#endif
}

}  // namespace cpu
}  // namespace fastmerge
