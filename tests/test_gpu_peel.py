"""Unaligned heads keep vector loads (issue #21, item 6).

- csrc/cuda/fm_peel.h (the head a CUDA launch peels) compiled with the system C++ compiler:
  equal misalignment -> a head, unequal -> element loads, mixed dtypes, a misaligned output.
- The CUDA merge's head / body launches (fmcuda::launch_peeled) run on the host with the
  kernel's per-thread group code (nvcc host compile, no GPU): bit for bit the shared
  per-element merge over every element offset 0..7, DARE counters included.
- Triton: views at odd offsets and odd sizes under the interpreter against the plain-torch
  kernels; the head/body/tail split of fastmerge/backends/triton/_peel.py.
- On a GPU (benchmarks/gpu_check.sh): offset views through the CUDA and Triton backends
  against the plain-torch kernels.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from helpers import make_finetunes
from test_cuda_compile import COMMON_DIR, CUDA_DIR, NVCC, _run_host_harness

from fastmerge import abi
from fastmerge.backends import availability, ops
from fastmerge.backends.triton import _peel
from fastmerge.methods import rng

CXX = shutil.which("g++") or shutil.which("c++")

PEEL_HARNESS = r"""
#include <cstdio>
#include "fm_peel.h"
using namespace fmpeel;

static int failures = 0;
alignas(64) static unsigned char buf[4096];

#define CHECK(cond) do { if (!(cond)) { std::printf("FAILED line %d: %s\n", __LINE__, #cond); \
                                        ++failures; } } while (0)

static const void* at(int byte) { return buf + 256 + byte; }

int main() {
  for (int k = 0; k < 8; ++k) {  // bf16 inputs and output, all k elements in (EPT 8)
    Span s[3] = {{at(2 * k), 2}, {at(512 + 2 * k), 2}, {at(1024 + 2 * k), 2}};
    CHECK(peel_head(s, 3, 8) == (8 - k) % 8);
    const Plan p = plan(s, 3, 8, 1000);
    CHECK(p.head == (8 - k) % 8 && p.vec_ok);
    const Plan tiny = plan(s, 3, 8, (8 - k) % 8);  // nothing left after the head
    CHECK(tiny.head == 0 && !tiny.vec_ok);
  }
  {  // unequal offsets: no head serves both
    Span s[2] = {{at(2), 2}, {at(512 + 6), 2}};
    CHECK(peel_head(s, 2, 8) == -1);
    const Plan p = plan(s, 2, 8, 1000);
    CHECK(p.head == 0 && !p.vec_ok);
  }
  {  // not even element-aligned
    Span s[1] = {{at(1), 2}};
    CHECK(peel_head(s, 1, 8) == -1);
  }
  {  // absent tensors (nullptr) do not constrain the head
    Span s[2] = {{nullptr, 4}, {at(6), 2}};
    CHECK(peel_head(s, 2, 8) == 5);
  }
  for (int j = 0; j < 8; ++j) {  // fp32 base + bf16 models at element j (EPT 4 and 8)
    Span s[3] = {{at(4 * j), 4}, {at(1024 + 2 * j), 2}, {at(2048 + 2 * j), 2}};
    const int h4 = peel_head(s, 3, 4), h8 = peel_head(s, 3, 8);
    CHECK(h4 == (4 - j % 4) % 4);  // fp32 16 bytes, bf16 8 bytes
    CHECK(h8 == (8 - j % 8) % 8);  // fp32 16 bytes (two loads of a 32-byte group), bf16 16
  }
  {  // float32 at 16 bytes needs no head even with EPT 8 (32-byte groups, two 16-byte loads)
    Span s[1] = {{at(16), 4}};
    CHECK(peel_head(s, 1, 8) == 0);
  }
  for (int k = 1; k < 8; ++k) {  // an aligned (fresh) output among inputs k elements in
    Span s[2] = {{at(2 * k), 2}, {at(1024), 2}};
    CHECK(peel_head(s, 2, 8) == -1);
    Span in[1] = {{at(2 * k), 2}};  // out_shift: where to start a fresh output instead
    const int h = peel_head(in, 1, 8);
    for (int ob = 2; ob <= 4; ob += 2) {
      const int sh = out_shift(in, 1, 8, ob);
      Span both[2] = {{at(2 * k), 2}, {at(1024 + ob * sh), ob}};
      CHECK(peel_head(both, 2, 8) == h);
    }
  }
  {  // aligned inputs: no shift
    Span in[1] = {{at(0), 2}};
    CHECK(out_shift(in, 1, 8, 2) == 0 && out_shift(in, 1, 8, 4) == 0);
  }
  CHECK(vector_align(8, 2) == 16 && vector_align(4, 2) == 8 && vector_align(8, 4) == 16);
  CHECK(vector_align(1, 4) == 4 && vector_align(2, 2) == 4);
  std::printf("%s\n", failures ? "FAIL" : "OK");
  return failures ? 1 : 0;
}
"""


@pytest.mark.skipif(CXX is None, reason="no C++ compiler found")
def test_peel_head_host(tmp_path):
    """fm_peel.h with the system compiler (no CUDA toolkit needed)."""
    src = tmp_path / "peel.cpp"
    src.write_text(PEEL_HARNESS)
    exe = tmp_path / "peel"
    proc = subprocess.run([CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-O1", "-I",
                           CUDA_DIR, str(src), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout


# The merge launcher's head / body split (launch_peeled, the same code the launcher calls),
# each part run with merge_group over its groups on the host: every element offset 0..7 of
# the inputs, the output placed where fm_cuda_fused_merge_out_shift says, DARE counters across
# 2^32; plus one model at another offset (element loads for the whole call).
PEELED_MERGE_HARNESS = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "fm_merge.cuh"
using namespace fmcuda;

static unsigned rng_state = 777u;
static unsigned rnd() { rng_state = rng_state * 1664525u + 1013904223u; return rng_state >> 8; }
static float rndf() { return (float)((int)(rnd() % 20001) - 10000) * 1e-4f; }

static std::vector<std::vector<unsigned char>> arena;
static void* alloc_at(int64_t bytes, int64_t shift_bytes) {  // 64-byte aligned + shift
  arena.emplace_back((size_t)bytes + 192);
  uintptr_t a = ((uintptr_t)arena.back().data() + 63) & ~(uintptr_t)63;
  return (void*)(a + shift_bytes);
}

static int failures = 0, peeled = 0;

template <int NT, int EPT, int WORDS>
void run_case(int n, int64_t numel, bool wide, int shift, int odd_model, int out_dt,
              int combine) {
  FmCudaInputs in;
  std::memset(&in, 0, sizeof in);
  in.n_models = n; in.numel = numel;
  in.base_dtype = wide ? DTYPE_FLOAT32 : DTYPE_BFLOAT16;
  void* base = alloc_at(numel * 4, shift * elem_size(in.base_dtype));
  in.base = base;
  for (int64_t j = 0; j < numel; ++j) fm_store(base, in.base_dtype, j, rndf());
  for (int i = 0; i < n; ++i) {
    in.model_dtype[i] = wide ? (int)(rnd() % 3) : 1 + (int)(rnd() % 2);
    if (wide && i == 0) in.model_dtype[i] = DTYPE_BFLOAT16;
    const int sh = i == odd_model ? shift + 1 : shift;
    void* m = alloc_at(numel * 4, sh * elem_size(in.model_dtype[i]));
    in.models[i] = m;
    in.moment_dtype[i] = DTYPE_FLOAT32;
    for (int64_t j = 0; j < numel; ++j)
      fm_store(m, in.model_dtype[i], j,
               fm_load(in.base, in.base_dtype, j) + 0.05f * rndf());
  }
  float fparams[FM_MAX_MODELS * 6];
  int64_t iparams[FM_MAX_MODELS * 3];
  FmModel models[FM_MAX_MODELS];
  for (int i = 0; i < n; ++i) {
    float* f = fparams + 6 * i;
    int64_t* p = iparams + 3 * i;
    f[0] = 0.5f + 0.25f * (float)(i % 3); f[1] = 1.0f + 0.5f * (float)(i % 2);
    f[2] = 0.01f; f[3] = fm_inf(); f[4] = 0.6f; f[5] = 1.0f;
    p[0] = 3;  // DARE: the mask depends on every element's global index
    p[1] = (int64_t)(0x9E3779B97F4A7C15ull * (uint64_t)(i + 1));
    p[2] = 1717986918;
    models[i] = fm_unpack_model(f, p);
  }
  FmCudaMergeArgs a;
  std::memset(&a, 0, sizeof a);
  a.combine = combine; a.score = SCORE_MAGNITUDE; a.normalize = NORMALIZE_WEIGHTS;
  a.consensus_k = 2; a.scale = 0.9f; a.power = 0.5f; a.eps = 1e-8f;
  a.offset = (1ll << 32) - 3; a.out_dtype = out_dt;
  const FmMergeConfig cfg = merge_config(n, models, a);

  const int oshift = merge_out_shift(in, out_dt);
  void* got = alloc_at(numel * 4 + 64, (int64_t)oshift * elem_size(out_dt));
  void* want = alloc_at(numel * 4 + 64, 0);
  unsigned int nf_got[FM_MAX_MODELS] = {0}, nf_want[FM_MAX_MODELS] = {0};
  for (int64_t j = 0; j < numel; ++j) {
    const float b = fm_load(in.base, in.base_dtype, j);
    float t[FM_MAX_MODELS];
    for (int i = 0; i < n; ++i) {
      const float m = fm_load(in.models[i], in.model_dtype[i], j);
      t[i] = combine == COMBINE_LINEAR ? m : fm_sub(m, b);
      if (!fm_isfinite(t[i])) ++nf_want[i];
    }
    fm_store(want, out_dt, j, fm_merge_element(cfg, models, t, nullptr, b,
                                               (uint64_t)(a.offset + j)));
  }
  int parts = 0;
  bool body_vec = false;
  launch_peeled(in, EPT, got, out_dt, [&](const FmCudaInputs& part, int64_t start, bool vec_ok) {
    ++parts;
    body_vec = vec_ok;
    if (vec_ok && !inputs_aligned(part, EPT, advance(got, out_dt, start), out_dt)) {
      std::printf("vector part not aligned: shift=%d\n", shift);
      ++failures;
    }
    FmCudaMergeArgs pa = a;
    pa.offset += start;
    void* o = const_cast<void*>(advance(got, out_dt, start));
    for (int64_t g = 0; g < (part.numel + EPT - 1) / EPT; ++g)
      merge_group<NT, EPT, WORDS>(part, ParamTable{part}, cfg, models, pa, g, vec_ok, o, nf_got);
    return cudaSuccess;
  });
  peeled += parts == 2;
  // one model at another offset: one call of element loads; a common offset: a vector body
  if ((odd_model >= 0 && (parts != 1 || body_vec)) || (odd_model < 0 && numel > 8 && !body_vec)) {
    std::printf("parts=%d vec=%d: shift=%d odd=%d numel=%lld\n", parts, (int)body_vec, shift,
                odd_model, (long long)numel);
    ++failures;
  }
  if (std::memcmp(got, want, (size_t)numel * elem_size(out_dt)) != 0 ||
      std::memcmp(nf_got, nf_want, sizeof nf_got) != 0) {
    std::printf("MISMATCH NT=%d EPT=%d n=%d numel=%lld shift=%d odd=%d out=%d combine=%d\n", NT,
                EPT, n, (long long)numel, shift, odd_model, out_dt, combine);
    ++failures;
  }
}

template <int NT, int EPT, int WORDS>
void sweep(int n, bool wide) {
  const int64_t sizes[] = {1, 5, 9, 37, 1003};
  for (int64_t numel : sizes)
    for (int shift = 0; shift < 8; ++shift)
      for (int out_dt = 0; out_dt < 3; ++out_dt)
        for (int odd = -1; odd < 1; ++odd)
          for (int combine : {COMBINE_LINEAR, COMBINE_TIES})
            run_case<NT, EPT, WORDS>(n, numel, wide, shift, odd, out_dt, combine);
}

int main() {
  sweep<1, 8, 4>(1, false); sweep<3, 8, 4>(3, false);
  sweep<1, 4, 4>(1, true); sweep<3, 4, 4>(3, true);
  sweep<0, 2, 1>(10, false);
  if (peeled == 0) { std::printf("no call was peeled\n"); ++failures; }
  std::printf("%s\n", failures ? "FAIL" : "OK");
  return failures ? 1 : 0;
}
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA group code cannot be "
                    "compiled for the host here")
def test_cuda_peeled_merge_on_host(tmp_path):
    """Head + body launches of a misaligned call == the shared per-element merge, bit for bit."""
    _run_host_harness(tmp_path, "peeled_merge", PEELED_MERGE_HARNESS)


def test_cuda_sources_peel():
    """The merge and histogram launchers peel; the statistics do not (their float64 partials
    would change bits with the partition); the binding shifts a fresh output like the inputs."""
    read = lambda name: open(os.path.join(CUDA_DIR, name)).read()  # noqa: E731
    assert "launch_peeled(" in read("fm_merge.cuh") and "launch_peeled(" in read("fm_histogram.cu")
    assert "launch_peeled(" not in read("fm_stats.cu")
    assert "fm_cuda_fused_merge_out_shift" in read("fm_binding.cpp")
    assert os.path.exists(os.path.join(COMMON_DIR, "fastmerge_math.h"))


# ----------------------------------------------------------------------------- Triton
def test_triton_pieces():
    """Head / body / tail of a launch: the body starts 16-byte aligned and its size divides
    by 16; views at different offsets (or an aligned call of 16k elements) stay whole."""
    assert _peel.pieces(4096, [(1024, 2), (2048, 4)]) == [(0, 4096)]
    assert _peel.pieces(4099, [(1024, 2)]) == [(0, 4096), (4096, 3)]
    assert _peel.pieces(4099, [(1026, 2), (2050, 2)]) == [(0, 7), (7, 4080), (4087, 12)]
    assert _peel.pieces(4099, [(1026, 2), (2054, 2)]) == [(0, 4099)]  # offsets 1 and 3
    assert _peel.pieces(5, [(1026, 2)]) == [(0, 5)]                     # all head
    assert _peel.pieces(23, [(1026, 2)]) == [(0, 7), (7, 16)]
    for k in range(8):  # float32 base + bf16 models at element k: one head aligns both
        h = _peel.head([(4096 + 4 * k, 4), (8192 + 2 * k, 2)])
        assert h == (8 - k) % 8 and (4096 + 4 * (k + h)) % 16 == 0
    assert _peel.head([(1025, 2)]) is None
    for k in range(8):  # a fresh output placed out_shift elements in gets the inputs' head
        spans = [(4096 + 2 * k, 2), (8192 + 4 * k, 4)]
        for ob in (2, 4):
            shift = _peel.out_shift(spans, ob)
            assert _peel.head(spans + [(65536 + ob * shift, ob)]) == _peel.head(spans)


def _offset_views(shape, n, offset, seed):
    """make_finetunes' tensors (bf16/fp16/fp32 models, fp32 second moments) as flat views
    ``offset`` elements into larger buffers, like chunk views at odd element offsets."""
    base, models, vs = make_finetunes(shape, n, ("bf16", "fp16", "fp32"), seed=seed,
                                      second_moments=True)

    def view(t):
        buf = torch.zeros(t.numel() + 16, dtype=t.dtype, device=DEV)
        buf[offset:offset + t.numel()] = t.reshape(-1).to(DEV)
        return buf[offset:offset + t.numel()]

    return view(base), [view(m) for m in models], [view(v) for v in vs]


def _packed(n):
    fp = torch.zeros(n, abi.NUM_FPARAMS, dtype=torch.float32)
    fp[:, abi.F_WEIGHT] = torch.tensor([0.5, 1.25, -0.75][:n])
    fp[:, abi.F_RESCALE] = torch.tensor([1.0, 2.0, 0.5][:n])
    fp[:, abi.F_LO] = 0.004
    fp[:, abi.F_HI] = float("inf")
    fp[:, abi.F_CONSENSUS_LAMBDA] = 0.6
    fp[:, abi.F_OTA_SCALE] = 1.0
    ip = torch.zeros(n, abi.NUM_IPARAMS, dtype=torch.int64)
    for i in range(n):  # DARE on every model: the masks depend on each element's index
        key = rng.dare_key(5, "w", i)
        ip[i, abi.I_MODE] = abi.MODE_DARE if i != 1 else abi.MODE_BAND
        ip[i, abi.I_DARE_KEY] = key - (1 << 64) if key >= 1 << 63 else key
        ip[i, abi.I_DARE_THRESHOLD] = rng.dare_keep_threshold(0.45)
    return fp.to(DEV), ip.to(DEV)


def _merge_args(combine):
    return (combine, abi.SCORE_MAGNITUDE, 0, 0, 1, 2, 0.8, 0.5, 1e-8, (1 << 32) - 9)


HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _check_offsets(be, numel, offset, seed=2):
    """``be`` on views ``offset`` elements in == ``be`` on fresh copies (bit for bit: merge
    and histograms; the statistics within float64 rounding) == the plain-torch kernels."""
    base, models, vs = _offset_views((numel,), 3, offset, seed)
    copies = (base.clone(), [m.clone() for m in models], [v.clone() for v in vs])
    fp, ip = _packed(3)
    for combine in (abi.COMBINE_TIES, abi.COMBINE_LINEAR):
        outs = []
        for b, ms, v in ((base, models, vs), copies):
            nf = torch.zeros(3, dtype=torch.int64, device=DEV)
            out = be.fused_merge(b, ms, v, fp, ip, *_merge_args(combine), torch.bfloat16, nf)
            outs.append((out, nf))
        (got, nf), (ref, nf_ref) = outs
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), (offset, combine)
        assert torch.equal(nf, nf_ref)
        nf_t = torch.zeros(3, dtype=torch.int64)
        want = ops.fused_merge_torch(base.cpu(), [m.cpu() for m in models], [],
                                     fp.cpu(), ip.cpu(), *_merge_args(combine), torch.bfloat16,
                                     nf_t)
        # float32 in another order, then bf16: a few elements one bf16 ulp apart at most
        diff = (got.cpu().float() - want.float()).abs()
        assert int((diff > 1e-2 * (want.float().abs() + 1e-3)).sum()) <= 2, (offset, combine)
    for score in (abi.SCORE_MAGNITUDE, abi.SCORE_FISHER):
        tg = torch.tensor([[0, 0], [2, 0]], dtype=torch.int64, device=DEV)
        res = []
        for b, ms, v in ((base, models, vs), copies):
            c = torch.zeros(2, abi.NUM_BINS, dtype=torch.int64, device=DEV)
            s = torch.zeros(2, abi.NUM_BINS, dtype=torch.float64, device=DEV)
            be.score_histogram(b, ms, v, score, tg, 0, c, s)
            res.append((c, s))
        assert torch.equal(res[0][0], res[1][0]) and int(res[0][0].sum()) == 2 * numel
        assert torch.equal(res[0][1], res[1][1]), (offset, score)
    st = []
    for b, ms, v in ((base, models, vs), copies):
        out = torch.zeros(3, 3, dtype=torch.float64, device=DEV)
        be.model_stats(b, ms, v, abi.SCORE_MAGNITUDE, fp, ip, 0.5, 77, out)
        st.append(out)
    assert torch.equal(st[0], st[1])  # neither backend splits the statistics


TRITON_OK, TRITON_WHY = availability("triton")


@pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable here: {TRITON_WHY}")
@pytest.mark.parametrize("numel,offset", [(3001, 0), (3001, 1), (3003, 3), (37, 5)])
def test_triton_offset_views(numel, offset, monkeypatch):
    """Odd sizes and views at odd offsets through the Triton backend (interpreter on CPU):
    split into head / body / tail launches with every index shifted, the same bits."""
    from fastmerge.backends import triton as tk
    splits = []
    pieces = _peel.pieces
    monkeypatch.setattr(_peel, "pieces", lambda *a: splits.append(pieces(*a)) or splits[-1])
    _check_offsets(tk.backend(), numel, offset)
    assert splits and all(sum(c for _, c in p) == numel for p in splits)
    heads = [p[0][1] for p in splits if p[0][1] < 8 and len(p) > 1]
    if offset:  # every merge (output placed like the views) and histogram call of the views
        assert len(heads) == 4 and set(heads) == {(16 - offset) % 8}  # 8 bf16 a vector
    else:
        assert not heads
    assert all(len(p) > 1 for p in splits) == (numel % 16 != 0 or offset != 0)


# ----------------------------------------------------------------------------- GPU kit
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("numel,offset", [(1 << 20, 0), ((1 << 20) + 5, 1), ((1 << 20) + 3, 3),
                                          (4099, 7), (13, 2)])
def test_gpu_offset_views(name, numel, offset):
    """Offset views on the GPU: the CUDA launcher's peeled head and the Triton split give the
    bits of aligned copies, and match the plain-torch kernels."""
    ok, why = availability(name)
    if not ok:
        pytest.skip(f"backend {name!r} unavailable here: {why}")
    from fastmerge.backends import get_backend
    _check_offsets(get_backend(name, DEV), numel, offset)
