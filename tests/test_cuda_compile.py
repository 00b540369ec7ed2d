"""CI compile check of the CUDA backend, runnable without a GPU.

- Every csrc/cuda/*.cu is compiled with nvcc alone (no torch) for sm_80 and sm_90 with the
  warnings-as-errors flags below; ptxas's register / stack / spill report of every kernel is
  parsed and printed (``pytest -s tests/test_cuda_compile.py`` shows the table).
- The exact-N fused merge kernels (the hot path) must not spill; the any-N fallback (N > 8)
  is allowed local memory for its per-element arrays.
- The torch binding (csrc/cuda/fm_binding.cpp) is syntax-checked with g++ against the installed
  torch headers where that is possible (a CPU build of torch ships the c10/cuda headers but
  not their generated config header, which is stubbed in a temporary directory).

The (file, arch) compiles run two at a time in a temporary directory; nothing is cached in the
repository. Skipped, with the reason, where nvcc (or g++) is missing.
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
COMMON_DIR = os.path.join(ROOT, "csrc", "common")
ARCHS = ("80", "90")
NVCC_FLAGS = ["-std=c++17", "-Werror", "all-warnings", "-Xptxas", "-v", "-O3"]
JOBS = int(os.environ.get("FASTMERGE_NVCC_JOBS", "2"))
SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: the CUDA kernels "
                                "cannot be compiled here (install the CUDA toolkit)")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_MERGE = re.compile(r"fused_merge_kernelILi(\d+)ELi(\d+)ELi(\d+)E")


def _short(name: str) -> str:
    m = _MERGE.search(name)
    if m:
        nt, ept, words = m.groups()
        return f"fused_merge<N={nt if nt != '0' else 'any'},ept={ept},words={words}>"
    for key in ("score_histogram_kernel", "model_stats_kernel", "reduce_partials_kernel"):
        if key in name:
            return key
    return name


def parse_ptxas(text: str) -> list[dict]:
    """Kernels of one ptxas -v log: name, arch, registers, stack, spill stores/loads."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "short": _short(m.group(1)), "arch": m.group(2),
                   "registers": None, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    return rows


def _compile(src: str, arch: str, outdir: str) -> dict:
    obj = os.path.join(outdir, f"{os.path.basename(src)}.sm{arch}.o")
    cmd = [NVCC, "-c", src, "-o", obj, "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           *NVCC_FLAGS, "-I", COMMON_DIR, "-I", CUDA_DIR]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    return {"src": os.path.basename(src), "arch": arch, "rc": proc.returncode, "log": log,
            "cmd": " ".join(cmd), "kernels": parse_ptxas(log)}


def _cost(src: str) -> int:  # compile the big translation units first
    return 0 if "merge_" in os.path.basename(src) else 1


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if not SOURCES:
        pytest.fail("no csrc/cuda/*.cu sources found")
    outdir = str(tmp_path_factory.mktemp("nvcc"))
    jobs = [(s, a) for s in sorted(SOURCES, key=_cost) for a in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, JOBS)) as pool:
        results = list(pool.map(lambda sa: _compile(sa[0], sa[1], outdir), jobs))
    _print_table(results)
    return results


def _print_table(results) -> None:
    lines = ["", "ptxas report (registers / stack frame bytes / spill stores+loads bytes):"]
    for r in sorted(results, key=lambda r: (r["src"], r["arch"])):
        for k in sorted(r["kernels"], key=lambda k: k["short"]):
            lines.append(f"  {r['src']:<20} {k['arch']:<6} {k['short']:<44} "
                         f"regs={k['registers']!s:<4} stack={k['stack']:<4} "
                         f"spill={k['spill_stores']}+{k['spill_loads']}")
    print("\n".join(lines), file=sys.stderr if os.environ.get("FASTMERGE_PTXAS_STDERR") else
          sys.stdout)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", [os.path.basename(s) for s in SOURCES])
def test_compiles(compiled, src, arch):
    r = next(r for r in compiled if r["src"] == src and r["arch"] == arch)
    assert r["rc"] == 0, f"nvcc failed:\n{r['cmd']}\n{r['log'][-6000:]}"
    # every translation unit with kernels reports them; the launcher-only fm_merge.cu has none
    if src != "fm_merge.cu":
        assert r["kernels"], f"ptxas reported no kernels for {src}:\n{r['log'][-2000:]}"
        for k in r["kernels"]:
            assert k["registers"] is not None, k


def test_expected_kernels(compiled):
    names = {(k["short"], k["arch"]) for r in compiled for k in r["kernels"]}
    for arch in ARCHS:
        sm = f"sm_{arch}"
        assert ("score_histogram_kernel", sm) in names
        assert ("model_stats_kernel", sm) in names
        assert ("reduce_partials_kernel", sm) in names
        for n in range(1, 9):
            for ept in (8, 4):
                assert (f"fused_merge<N={n},ept={ept},words=4>", sm) in names, (n, ept, arch)


def test_histogram_and_stats_are_order_free():
    """Review fixes kept: the level-0 histogram counts in a block-private shared-memory
    histogram (no CUB radix sort per tile); no float atomics whose order would change the
    statistics' or the Fisher histograms' bits (exact integer limbs and mantissa sums, per-block
    partials reduced in a fixed order)."""
    hist = open(os.path.join(CUDA_DIR, "fm_histogram.cu")).read()
    stats = open(os.path.join(CUDA_DIR, "fm_stats.cu")).read()
    assert "BlockRadixSort" not in hist and "extern __shared__ unsigned int s_hist[]" in hist
    assert "__match_any_sync" in hist and "add_limbs" in hist
    assert "atomicAdd(" not in stats
    assert "reduce_partials_kernel" in stats


def test_setup_ships_ptx():
    """setup.py's default architecture list carries PTX, so GPUs newer than it JIT the kernels."""
    text = open(os.path.join(ROOT, "setup.py")).read()
    archs = re.search(r'DEFAULT_CUDA_ARCHS = "([^"]+)"', text).group(1)
    assert archs.endswith("+PTX") and "8.0" in archs and "9.0" in archs


def test_no_spills_in_hot_kernels(compiled):
    bad = [(r["src"], k["arch"], k["short"], k["spill_stores"], k["spill_loads"])
           for r in compiled for k in r["kernels"]
           if "N=any" not in k["short"] and (k["spill_stores"] or k["spill_loads"])]
    assert not bad, f"register spills in: {bad}"


def test_no_local_memory_in_exact_n_merge(compiled):
    """The exact-N merge kernels keep their per-element arrays in registers (stack 0)."""
    bad = [(k["arch"], k["short"], k["stack"]) for r in compiled for k in r["kernels"]
           if k["short"].startswith("fused_merge<N=") and "N=any" not in k["short"]
           and k["stack"]]
    assert not bad, f"stack frames (local memory) in: {bad}"


def _torch_include():
    try:
        import torch.utils.cpp_extension as ce
    except ImportError:
        return None
    return ce.include_paths()


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_binding_syntax(tmp_path):
    """fm_binding.cpp parses against the installed torch (C++20, as torch 2.13 builds)."""
    incs = _torch_include()
    if incs is None:
        pytest.skip("torch is not importable")
    if not any(os.path.exists(os.path.join(i, "c10", "cuda", "CUDAGuard.h")) for i in incs):
        pytest.skip("this torch ships no c10/cuda headers")
    cuda_inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include")
    cands = [cuda_inc, "/usr/local/cuda/include"]
    cuda_inc = next((c for c in cands if os.path.exists(os.path.join(c, "cuda_runtime.h"))), None)
    if cuda_inc is None:
        pytest.skip("cuda_runtime.h not found")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    # generated at torch's build time only in CUDA builds of torch
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["g++", "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror",
           "-isystem", str(tmp_path)]
    for inc in incs + [sysconfig.get_paths()["include"], cuda_inc]:
        cmd += ["-isystem", inc]
    cmd += ["-I", CUDA_DIR, os.path.join(CUDA_DIR, "fm_binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]


# A host program (nvcc, no GPU needed) that runs the kernels' register-queue helpers of
# csrc/cuda/fm_device.cuh on the host: popping elements from raw vector-load words and pushing
# results into the output words must give exactly the shared header's fm_load / fm_store.
HOST_HARNESS = r"""
#include <cstdio>
#include <cstring>
#include "fm_device.cuh"
using namespace fmcuda;

static int failures = 0;

template <int EPT, int WORDS>
void check_take(int dtype, unsigned seed) {
  unsigned char bytes[64] = {0};
  const int esz = elem_size(dtype);
  for (int i = 0; i < EPT * esz; ++i)
    bytes[i] = (unsigned char)((seed * 2654435761u >> (i % 24)) + i * 37);
  uint32_t w[WORDS];
  std::memcpy(w, bytes, sizeof w);  // what one little-endian vector load of the group gives
  for (int e = 0; e < EPT; ++e) {
    const float want = fm_load(bytes, dtype, e);
    const float got = take_front<EPT, WORDS>(w, dtype);
    if (fm_f2u(want) != fm_f2u(got) && !(want != want && got != got)) {
      std::printf("take_front<%d,%d> dtype %d element %d: %08x != %08x\n", EPT, WORDS, dtype, e,
                  fm_f2u(got), fm_f2u(want));
      ++failures;
    }
  }
}

template <int EPT>
void check_push(int dtype, unsigned seed) {
  float vals[EPT];
  unsigned char want[64] = {0}, got[64] = {0};
  for (int e = 0; e < EPT; ++e) {
    vals[e] = (float)((int)(seed * 7919u + e * 104729u) % 20001 - 10000) * 0.0123f;
    fm_store(want, dtype, e, vals[e]);
  }
  uint32_t o[EPT] = {0};
  for (int e = 0; e < EPT; ++e) push_back<EPT>(o, dtype, vals[e]);
  std::memcpy(got, o, (size_t)EPT * elem_size(dtype));
  if (std::memcmp(got, want, (size_t)EPT * elem_size(dtype)) != 0) {
    std::printf("push_back<%d> dtype %d differs\n", EPT, dtype);
    ++failures;
  }
}

int main() {
  for (unsigned seed = 1; seed < 200; ++seed) {
    for (int d = 1; d <= 2; ++d) {  // 16-bit dtypes in every shape
      check_take<8, 4>(d, seed); check_take<4, 4>(d, seed); check_take<2, 1>(d, seed);
      check_take<1, 1>(d, seed); check_take<8, 8>(d, seed);
    }
    check_take<4, 4>(0, seed); check_take<1, 1>(0, seed); check_take<8, 8>(0, seed);
    for (int d = 0; d <= 2; ++d) {
      check_push<8>(d, seed); check_push<4>(d, seed); check_push<2>(d, seed);
      check_push<1>(d, seed);
    }
  }
  std::printf("%s\n", failures ? "FAIL" : "OK");
  return failures ? 1 : 0;
}
"""


def _run_host_harness(tmp_path, name: str, source: str):
    """``source`` compiled with nvcc for the host and run: it must print OK last."""
    src = tmp_path / f"{name}.cu"
    src.write_text(source)
    exe = tmp_path / name
    cmd = [NVCC, "-std=c++17", "-O1", "-Werror", "all-warnings", "-I", COMMON_DIR, "-I",
           CUDA_DIR, str(src), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), \
        run.stdout[-4000:] + run.stderr


def test_host_harness_queues(tmp_path):
    """The register element queues of the merge kernel, executed on the host (no GPU)."""
    _run_host_harness(tmp_path, "harness", HOST_HARNESS)


# The merge kernel's per-thread group code (fmcuda::merge_group: vector loads, register
# queues, tails, unaligned inputs, output packing, non-finite counting), executed on the host
# over whole tensors and compared bit for bit with the shared per-element function
# fm_merge_element applied element by element.
MERGE_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "fm_merge.cuh"
using namespace fmcuda;

static unsigned rng_state = 12345u;
static unsigned rnd() { rng_state = rng_state * 1664525u + 1013904223u; return rng_state >> 8; }
static float rndf() { return (float)((int)(rnd() % 20001) - 10000) * 1e-4f; }

struct Buf {  // 64-byte aligned storage; `shift` elements in (to test unaligned views)
  std::vector<unsigned char> raw;
  void* p;
  Buf(int64_t bytes, int shift_bytes) : raw((size_t)bytes + 128) {
    uintptr_t a = ((uintptr_t)raw.data() + 63) & ~(uintptr_t)63;
    p = (void*)(a + shift_bytes);
  }
};

static int failures = 0;

template <int NT, int EPT, int WORDS>
void run_case(int n, int64_t numel, const int* dts, int base_dt, bool has_base, bool moments,
              int combine, int out_dt, int shift, int64_t offset) {
  std::vector<Buf> bufs;
  bufs.reserve(2 * n + 3);
  FmCudaInputs in;
  std::memset(&in, 0, sizeof in);
  in.n_models = n; in.numel = numel; in.has_moments = moments ? 1 : 0;
  bufs.emplace_back(numel * 4, shift * elem_size(base_dt));
  in.base = has_base ? bufs.back().p : nullptr; in.base_dtype = base_dt;
  for (int64_t j = 0; j < numel; ++j) fm_store(bufs.back().p, base_dt, j, rndf());
  for (int i = 0; i < n; ++i) {
    bufs.emplace_back(numel * 4, shift * elem_size(dts[i]));
    in.models[i] = bufs.back().p; in.model_dtype[i] = dts[i];
    for (int64_t j = 0; j < numel; ++j) {
      float x = fm_load(in.base ? in.base : bufs[0].p, base_dt, j) * (has_base ? 1.f : 0.f);
      x += 0.05f * rndf();
      if (rnd() % 997 == 0) x = fm_inf();  // a few non-finite elements
      fm_store(bufs.back().p, dts[i], j, x);
    }
    in.moment_dtype[i] = DTYPE_FLOAT32;
    if (moments) {
      bufs.emplace_back(numel * 4, shift * 4);
      in.moments[i] = bufs.back().p;
      for (int64_t j = 0; j < numel; ++j) fm_store(bufs.back().p, 0, j, fm_abs(rndf()) * 1e-3f);
    }
  }
  float fparams[FM_MAX_MODELS * 6];
  int64_t iparams[FM_MAX_MODELS * 3];
  FmModel models[FM_MAX_MODELS];
  for (int i = 0; i < n; ++i) {
    float* f = fparams + 6 * i;
    int64_t* p = iparams + 3 * i;
    f[0] = 0.5f + 0.25f * (float)(i % 3); f[1] = 1.0f + 0.5f * (float)(i % 2);
    f[2] = 0.01f * (float)(i % 4); f[3] = (i % 3 == 1) ? 0.04f : fm_inf();
    f[4] = 0.6f; f[5] = 1.0f + (float)i;
    p[0] = i % 4;  // keep all, band, keep none, DARE
    p[1] = (int64_t)(0x9E3779B97F4A7C15ull * (uint64_t)(i + 1));
    p[2] = 1717986918;  // ~0.4 * 2^32
    models[i] = fm_unpack_model(f, p);
  }
  FmCudaMergeArgs a;
  std::memset(&a, 0, sizeof a);
  a.combine = combine; a.score = moments ? SCORE_FISHER : SCORE_MAGNITUDE;
  a.elect = 0; a.elect_on = 0; a.normalize = combine == COMBINE_TIES ? NORMALIZE_WEIGHTS : 0;
  a.consensus_k = 2; a.scale = 0.9f; a.power = 0.5f; a.eps = 1e-8f; a.offset = offset;
  a.out_dtype = out_dt;
  const FmMergeConfig cfg = merge_config(n, models, a);

  Buf got(numel * 4 + 64, 0), want(numel * 4 + 64, 0);
  unsigned int nf_got[FM_MAX_MODELS] = {0}, nf_want[FM_MAX_MODELS] = {0};
  for (int64_t j = 0; j < numel; ++j) {  // the oracle: one element at a time
    const float b = in.base ? fm_load(in.base, base_dt, j) : 0.0f;
    float t[FM_MAX_MODELS], v[FM_MAX_MODELS];
    for (int i = 0; i < n; ++i) {
      const float m = fm_load(in.models[i], dts[i], j);
      t[i] = (combine == COMBINE_LINEAR || !in.base) ? m : fm_sub(m, b);
      if (!fm_isfinite(t[i])) ++nf_want[i];
      v[i] = moments ? fm_load(in.moments[i], 0, j) : 0.0f;
    }
    fm_store(want.p, out_dt, j, fm_merge_element(cfg, models, t, moments ? v : nullptr, b,
                                                 (uint64_t)(offset + j)));
  }
  const bool vec_ok = inputs_aligned(in, EPT, got.p, out_dt);
  const int64_t groups = (numel + EPT - 1) / EPT;
  for (int64_t g = 0; g < groups; ++g)
    merge_group<NT, EPT, WORDS>(in, ParamTable{in}, cfg, models, a, g, vec_ok, got.p, nf_got);
  const size_t bytes = (size_t)numel * elem_size(out_dt);
  if (std::memcmp(got.p, want.p, bytes) != 0 || std::memcmp(nf_got, nf_want, sizeof nf_got)) {
    std::printf("MISMATCH NT=%d EPT=%d n=%d numel=%lld combine=%d out=%d shift=%d vec=%d\n",
                NT, EPT, n, (long long)numel, combine, out_dt, shift, (int)vec_ok);
    ++failures;
  }
}

template <int NT, int EPT, int WORDS>
void sweep(int n, bool wide) {
  const int64_t sizes[] = {1, 7, 8, 9, 31, 64, 1003};
  for (int64_t numel : sizes)
    for (int combine = 0; combine < NUM_COMBINES; ++combine)
      for (int out_dt = 0; out_dt < 3; ++out_dt)
        for (int shift = 0; shift < 2; ++shift) {
          int dts[FM_MAX_MODELS];
          for (int i = 0; i < n; ++i) dts[i] = wide ? (int)(rnd() % 3) : 1 + (int)(rnd() % 2);
          const int base_dt = wide ? 0 : 2;
          const bool moments = combine == COMBINE_OTA && wide;
          if (combine == COMBINE_OTA && !wide) continue;  // OTA reads float32 moments
          run_case<NT, EPT, WORDS>(n, numel, dts, base_dt, combine != 0 || shift, moments,
                                   combine, out_dt, shift, shift ? (1ll << 32) - 5 : 0);
        }
}

int main() {
  sweep<1, 8, 4>(1, false); sweep<2, 8, 4>(2, false); sweep<3, 8, 4>(3, false);
  sweep<8, 8, 4>(8, false);
  sweep<1, 4, 4>(1, true); sweep<3, 4, 4>(3, true); sweep<8, 4, 4>(8, true);
  sweep<0, 2, 1>(11, false); sweep<0, 1, 1>(9, true);
  std::printf("%s\n", failures ? "FAIL" : "OK");
  return failures ? 1 : 0;
}
"""


def test_host_harness_merge_groups(tmp_path):
    """merge_group (the merge kernel's per-thread body) on the host == fm_merge_element."""
    _run_host_harness(tmp_path, "merge_harness", MERGE_HARNESS)


def test_launcher_header_matches_ops():
    """fm_cuda.h's constants are those of fastmerge/abi.py (the .cu files static_assert them
    against csrc/common as well)."""
    from fastmerge import abi
    text = open(os.path.join(CUDA_DIR, "fm_cuda.h")).read()
    consts = dict(re.findall(r"#define (FM_CUDA_\w+) (\d+)", text))
    assert int(consts["FM_CUDA_NUM_FPARAMS"]) == abi.NUM_FPARAMS
    assert int(consts["FM_CUDA_NUM_IPARAMS"]) == abi.NUM_IPARAMS
    assert int(consts["FM_CUDA_NUM_BINS"]) == abi.NUM_BINS
    assert "FM_CUDA_F32 = 0, FM_CUDA_F16 = 1, FM_CUDA_BF16 = 2" in text
