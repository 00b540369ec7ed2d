// fastmerge CPU backend: raw-pointer kernels (no torch headers). The torch binding
// (binding.cpp) validates tensors and calls these; the per-element math comes from the shared
// header csrc/common/fastmerge_math.h, which the CUDA backend compiles too.
#pragma once

#include <stdint.h>

#include "fastmerge_math.h"

namespace fastmerge {
namespace cpu {

// Inputs of one chunk: base (optional), N models, N second moments (optional), all of `numel`
// contiguous elements, each with its own dtype code (DTYPE_* of fastmerge_params.h).
struct Inputs {
  const void* base = nullptr;
  int base_dtype = DTYPE_FLOAT32;
  const void* models[FM_MAX_MODELS] = {};
  int model_dtypes[FM_MAX_MODELS] = {};
  const void* moments[FM_MAX_MODELS] = {};
  int moment_dtypes[FM_MAX_MODELS] = {};
  bool has_moments = false;
  int n = 0;
  int64_t numel = 0;
};

// Radix digit histograms of the score bits for T targets (model, prefix), accumulated into
// counts[T][NUM_BINS] (int64) and sums[T][NUM_BINS] (float64 sums of |t|). False if a work
// buffer could not be allocated (the outputs are then incomplete).
bool score_histogram(const Inputs& in, int score, const int64_t* targets, int n_targets, int level,
                     int64_t* counts, double* sums, int nthreads);
// Level 1 of the magnitude score for rows (model, prefix) that each bin widths[r] consecutive
// prefixes from prefix on: row r's widths[r] tables of NUM_BINS follow row r - 1's in counts /
// sums (the guessed bins of a chunked selection, gathered in its level-0 read).
bool score_histogram_windows(const Inputs& in, const int64_t* targets, const int* widths,
                             int n_targets, int64_t* counts, double* sums, int nthreads);

// Exact k-th largest |t_i| for R requests (model req_model[r], k = req_k[r], 1 <= k <= numel)
// in one read pass over a window chosen from a sample (select.cpp). thr_bits[r] = the float32
// bit pattern of T(k), or -1 where the window missed (the caller then runs the radix
// selection); with l1, kept_l1[r] = sum of |t| >= T(k) and total_l1[i] += sum |t_i|;
// nonfinite[i] += the count of NaN/Inf task-vector values. margin_sd: the window's half-width
// in standard deviations of the sample rank (5 by default; 0 for tests of the miss path);
// isa: 0 the portable scan, 2 the best this CPU has (for tests).
void topk_window(const Inputs& in, const int64_t* req_model, const int64_t* req_k, int R, bool l1,
                 int64_t* thr_bits, double* kept_l1, double* total_l1, int64_t* nonfinite,
                 int nthreads, double margin_sd = 5.0, int isa = 2);

// out[N][3] += (sum |t_i|, sum |t_i| over kept elements, sum max(v_i, 0)^power).
void model_stats(const Inputs& in, int score, const FmModel* models, float power, int64_t offset,
                 double* out, int nthreads);

// NaN/Inf values a kernel stored to its output chunk: their count and the chunk index of the
// first (-1: none). Taken in the store, on the bits written (a finite float32 can round to Inf
// in float16), so the pipeline needs no second pass over the output (count_nonfinite_values).
struct StoredNonfinite {
  int64_t count = 0;
  int64_t first = -1;
  void add(int64_t c, int64_t at) {
    if (c == 0) return;
    count += c;
    if (first < 0 || at < first) first = at;
  }
};

// The fused one-pass merge: writes numel elements of out_dtype to out and adds the per-model
// counts of non-finite task-vector values to nonfinite[N]; with `stored`, adds what the store
// wrote that is NaN/Inf. False if a work buffer could not be allocated (the output is then
// incomplete).
bool fused_merge(const Inputs& in, const FmMergeConfig& cfg, const FmModel* models, int64_t offset,
                 void* out, int out_dtype, int64_t* nonfinite, int nthreads,
                 StoredNonfinite* stored = nullptr);

// out[k] = the DARE word of element j0 + k for k < len (semantics v2: word j & 3 of Philox4x32-10
// of counter j >> 2, so one call per four elements), on the widest SIMD unit the CPU has
// (philox_block.cpp); bit-identical to fm_philox_dare_word.
void philox_dare_block(uint32_t key_lo, uint32_t key_hi, uint64_t j0, int64_t len, uint32_t* out);
// The same on a chosen path (0 scalar, 1 AVX2, 2 AVX-512, or the best below it this CPU has);
// returns the path used. For tests.
int philox_dare_isa(uint32_t key_lo, uint32_t key_hi, uint64_t j0, int64_t len, uint32_t* out,
                    int isa);

// della / della_linear (della.cpp; fastmerge/methods/della.py is the semantics) over a chunk of
// whole rows of row_len elements whose first element is tensor element `offset`.
struct DellaParams {
  int64_t row_len = 1;
  const double* density = nullptr;  // [n]
  const double* epsilon = nullptr;  // [n]
  const uint64_t* keys = nullptr;   // [n] Philox keys (rng.dare_key)
  const float* weight = nullptr;    // [n] (apply)
  const float* scale = nullptr;     // [n] L1 rescale factors, 1 without rescale (apply)
  float lambda = 1.0f;              // (apply)
  bool elect = true;                // TIES sign election (della) or a plain sum (della_linear)
  bool normalize = true;
  // keep-mask bits of the whole tensor: n planes of mask_rows rows of ceil(row_len / 64)
  // words, written by della_reduce and read by della_apply instead of ranking again; or null
  uint64_t* mask = nullptr;
  int64_t mask_rows = 0;
};
// l1[2 i] += sum |d_i|, l1[2 i + 1] += sum of the kept |d_i| (float64, rows in order, so the
// same bits in any chunking or thread count); nonfinite[n + 1] += NaN/Inf counts of the models
// and the base. False if a work buffer could not be allocated.
bool della_reduce(const Inputs& in, const DellaParams& p, int64_t offset, double* l1,
                  int64_t* nonfinite, int nthreads);
// The merged chunk (numel elements of out_dtype); nonfinite as della_reduce, `stored` as
// fused_merge's.
bool della_apply(const Inputs& in, const DellaParams& p, int64_t offset, void* out, int out_dtype,
                 int64_t* nonfinite, int nthreads, StoredNonfinite* stored = nullptr);

// Whether fused_merge takes the AVX-512 block path of merge_avx512.h where it applies (on by
// default; tests switch it off to compare it byte for byte with the generic code). set_*
// returns the previous setting.
bool merge_fast_path_enabled();
bool set_merge_fast_path(bool on);

// out[m][m] = the float64 Gram matrix of the n vectors vecs[i] (numel elements of dtype code
// dtypes[i]), m = n; with tasks, of the float32 task vectors vecs[i] - vecs[n - 1], m = n - 1
// (gram.cpp). The same bits for any thread count. False if a work buffer could not be allocated.
bool gram_matrix(const void* const* vecs, const int* dtypes, int n, int64_t numel, bool tasks,
                 double* out, int nthreads);

// The float16 output store (store_half.cpp): len values of src rounded as fm_float_to_half into
// dst; returns whether one written is NaN/Inf. set_store_half_isa picks its conversion (0 the
// scalar reference, 1 F16C, 2 the best this CPU has; for tests) and returns the previous setting.
bool store_half(const float* __restrict src, int len, uint16_t* __restrict dst);
int set_store_half_isa(int isa);

// Which instruction set the multiversioned kernels picked on this machine (for reports).
const char* isa_name();

// The NaN/Inf elements of n values of dtype code `dtype` (DTYPE_* of fastmerge_params.h): their
// count, and in *first the index of the first one (-1 if none); one vectorised pass
// (nonfinite.cpp), the pipeline's check of every merged output chunk.
int64_t count_nonfinite_values(const void* data, int64_t n, int dtype, int64_t* first);

}  // namespace cpu
}  // namespace fastmerge
