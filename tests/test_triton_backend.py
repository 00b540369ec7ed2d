"""Triton backend specifics: Philox known answers inside a Triton kernel, DARE masks, chunking
(offsets) == whole, exact histograms/stats against the plain-torch kernels, torch.library
registration (opcheck), and full-size runs on a GPU when one is present.

Without a GPU every kernel runs in the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported)."""
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import make_finetunes
from test_rng import DARE_V2_KAT, DARE_V2_KEEP, KAT_DENSITY

import fastmerge as fm
from fastmerge import abi
from fastmerge.backends import availability, get_backend, ops
from fastmerge.methods import rng
from fastmerge.methods.kernel_params import COMBINE_IDS
from fastmerge.planning.selection import Chunk

ok, why = availability("triton")
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable here: {why}")

NAME = "model.layers.3.mlp.up_proj.weight"
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _tk():
    from fastmerge.backends import triton as triton_kernels
    return triton_kernels


def _bits64(u64: int) -> int:
    return u64 - (1 << 64) if u64 >= 1 << 63 else u64


# ----------------------------------------------------------------------------- Philox
KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: counter, key, expected output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_known_answers_in_triton():
    K = _tk().kernels()
    rows = KAT + [KAT[0]]  # the kernel's block is a power of two
    ctr = torch.tensor([r[0] for r in rows], dtype=torch.int64, device=DEV)
    key = torch.tensor([r[1] for r in rows], dtype=torch.int64, device=DEV)
    out = torch.zeros(len(rows), 4, dtype=torch.int64, device=DEV)
    K._philox_kat_kernel[(1,)](ctr, key, out, BLOCK=len(rows))
    assert out.cpu().tolist() == [list(r[2]) for r in rows]


@pytest.mark.parametrize("seed,name,model,start", [
    (0, "", 0, 0),
    (7, NAME, 2, 123),
    (2**64 - 1, "lm_head.weight", 5, (1 << 32) - 300),   # crosses the hi32 counter word
    (12345, "x", 1, (1 << 40) + 17),                      # > 2^32 element offsets
])
def test_philox_stream_matches_rng(seed, name, model, start):
    K = _tk().kernels()
    key = rng.dare_key(seed, name, model)
    n = 700
    out = torch.zeros(n, dtype=torch.int64, device=DEV)
    K._philox_stream_kernel[(1,)](out, _bits64(key), start, n, BLOCK=1024)
    assert torch.equal(out.cpu(), rng.philox_uniform_u32(key, start, n))


def test_dare_v2_known_answers_in_triton():
    """semantics v2's known DARE words (tests/test_rng.py) from the Triton stream kernel at starts
    of every residue modulo 4, and the keep bits from the fused kernel at such chunk offsets."""
    K = _tk().kernels()
    for (seed, name, i, j, word), keep in zip(DARE_V2_KAT, DARE_V2_KEEP):
        key = rng.dare_key(seed, name, i)
        for before in (0, 1, 2, 3):
            b = min(before, j)
            out = torch.zeros(16, dtype=torch.int64, device=DEV)
            K._philox_stream_kernel[(1,)](out, _bits64(key), j - b, 16, BLOCK=16)
            assert int(out[b]) == word, (seed, name, i, j, before)
        at = min(j, 5)
        fp = torch.zeros(1, abi.NUM_FPARAMS, dtype=torch.float32, device=DEV)
        fp[0, abi.F_WEIGHT] = 1.0
        fp[0, abi.F_RESCALE] = 1.0
        ip = torch.tensor([[abi.MODE_DARE, _bits64(key), rng.dare_keep_threshold(KAT_DENSITY)]],
                          dtype=torch.int64, device=DEV)
        nf = torch.zeros(1, dtype=torch.int64, device=DEV)
        got = _tk().backend().fused_merge(
            torch.zeros(16, device=DEV), [torch.ones(16, device=DEV)], [], fp, ip,
            COMBINE_IDS["sum"], 0, 0, 0, 0, 2, 1.0, 0.5, 1e-8, j - at, torch.float32, nf)
        assert bool(got[at].cpu() != 0) == keep, (seed, name, i, j)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**63 + 5])
def test_dare_masks_identical(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    shape = (37, 29)
    t = (torch.rand(shape, generator=g) + 0.5).to(torch.bfloat16)   # nonzero task vectors
    models = [t, -t, 2 * t]
    dens = [0.3, 0.5, 0.9]
    out_masks = []
    for i in range(3):
        # one model at a time, base 0, weight 1, no rescale: out != 0 iff kept; model index i
        # enters the key, so merge all three and read model i's contribution by zeroing others
        ms = [torch.zeros_like(t) if k != i else models[i] for k in range(3)]
        out = fm.merge_tensors(torch.zeros(shape, dtype=torch.bfloat16, device=DEV),
                               [m.to(DEV) for m in ms], "dare_linear", density=dens,
                               seed=seed, rescale=None, tensor_name=NAME, backend="triton",
                               out_dtype=torch.float32)
        out_masks.append(out.cpu() != 0)
    for i in range(3):
        want = rng.dare_mask(shape, dens[i], seed, NAME, i)
        assert torch.equal(out_masks[i], want), f"model {i}"


# ----------------------------------------------------------------------------- primitives
def _inputs(shape=(53, 19), n=3, seed=0):
    base, models, vs = make_finetunes(shape, n, ("bf16", "fp16", "fp32"), seed=seed,
                                      second_moments=True)
    return base.to(DEV), [m.to(DEV) for m in models], [v.to(DEV) for v in vs]


@pytest.mark.parametrize("score", [abi.SCORE_MAGNITUDE, abi.SCORE_FISHER])
def test_histograms_exact(score):
    base, models, vs = _inputs()
    be = _tk().backend()
    for level, targets in ((0, [[0, 0], [1, 0], [2, 0]]), (1, [[2, 0], [0, 0], [1, 0]])):
        tg = torch.tensor(targets, dtype=torch.int64)
        if level == 1:  # use the most populated level-0 bin of each model as the prefix
            c0 = torch.zeros(3, abi.NUM_BINS, dtype=torch.int64)
            s0 = torch.zeros(3, abi.NUM_BINS, dtype=torch.float64)
            ops.score_histogram_torch(base.cpu(), [m.cpu() for m in models],
                                      [v.cpu() for v in vs], score,
                                      torch.tensor([[0, 0], [1, 0], [2, 0]]), 0, c0, s0)
            tg[:, 1] = c0[tg[:, 0]].argmax(1)
        want_c = torch.zeros(3, abi.NUM_BINS, dtype=torch.int64)
        want_s = torch.zeros(3, abi.NUM_BINS, dtype=torch.float64)
        ops.score_histogram_torch(base.cpu(), [m.cpu() for m in models], [v.cpu() for v in vs],
                                  score, tg, level, want_c, want_s)
        got_c = torch.zeros(3, abi.NUM_BINS, dtype=torch.int64, device=DEV)
        got_s = torch.zeros(3, abi.NUM_BINS, dtype=torch.float64, device=DEV)
        be.score_histogram(base, models, vs, score, tg.to(DEV), level, got_c, got_s)
        assert torch.equal(got_c.cpu(), want_c)
        assert int(want_c.sum()) > 0
        torch.testing.assert_close(got_s.cpu(), want_s, rtol=1e-12, atol=1e-15)


def test_histogram_aggregated_path_exact(monkeypatch):
    """The GPU default for level 0 (sort + segmented scans, one atomic per distinct bin) gives
    the plain-atomic counts exactly; run on small blocks here (the interpreter is slow at
    sort/scan)."""
    from fastmerge.backends.triton import _registry
    base, models, vs = _inputs((300,), 2, seed=6)
    models[1][:40] = base[:40]          # zeros: a crowded bin
    for score, level in ((abi.SCORE_MAGNITUDE, 0), (abi.SCORE_FISHER, 0),
                         (abi.SCORE_MAGNITUDE, 1)):
        tg = torch.tensor([[1, 0], [0, 0]], dtype=torch.int64)
        c0 = torch.zeros(2, abi.NUM_BINS, dtype=torch.int64)
        s0 = torch.zeros(2, abi.NUM_BINS, dtype=torch.float64)
        ops.score_histogram_torch(base.cpu(), [m.cpu() for m in models], [v.cpu() for v in vs],
                                  score, tg, 0, c0, s0)
        if level == 1:
            tg[:, 1] = c0.argmax(1)
            c0.zero_()
            s0.zero_()
            ops.score_histogram_torch(base.cpu(), [m.cpu() for m in models],
                                      [v.cpu() for v in vs], score, tg, 1, c0, s0)
        monkeypatch.setenv("FASTMERGE_TRITON_HIST_AGGREGATE", "1")
        monkeypatch.setenv("FASTMERGE_TRITON_BLOCK", "128")
        got_c = torch.zeros(2, abi.NUM_BINS, dtype=torch.int64, device=DEV)
        got_s = torch.zeros(2, abi.NUM_BINS, dtype=torch.float64, device=DEV)
        _tk().backend().score_histogram(base, models, vs, score, tg.to(DEV), level, got_c,
                                        got_s)
        monkeypatch.delenv("FASTMERGE_TRITON_HIST_AGGREGATE")
        monkeypatch.delenv("FASTMERGE_TRITON_BLOCK")
        assert _registry._aggregate_histogram(0) == (not _tk().interpreting())
        assert torch.equal(got_c.cpu(), c0)
        torch.testing.assert_close(got_s.cpu(), s0, rtol=1e-12, atol=1e-15)


def _packed(n, modes, seed=3):
    fp = torch.zeros(n, abi.NUM_FPARAMS, dtype=torch.float32)
    fp[:, abi.F_WEIGHT] = torch.tensor([0.5, 1.25, -0.75, 1.0][:n])
    fp[:, abi.F_RESCALE] = torch.tensor([1.0, 2.0, 0.5, 1.5][:n])
    fp[:, abi.F_LO] = 0.004
    fp[:, abi.F_HI] = float("inf")
    fp[1 % n, abi.F_HI] = 0.012
    fp[:, abi.F_CONSENSUS_LAMBDA] = 0.6
    fp[:, abi.F_OTA_SCALE] = torch.tensor([1.0, 30.0, 0.25, 2.0][:n])
    ip = torch.zeros(n, abi.NUM_IPARAMS, dtype=torch.int64)
    for i, mode in enumerate(modes[:n]):
        ip[i, abi.I_MODE] = mode
        ip[i, abi.I_DARE_KEY] = _bits64(rng.dare_key(seed, NAME, i))
        ip[i, abi.I_DARE_THRESHOLD] = rng.dare_keep_threshold(0.45)
    return fp, ip


MODES = [abi.MODE_BAND, abi.MODE_DARE, abi.MODE_KEEP_ALL, abi.MODE_KEEP_NONE]


def test_model_stats_matches_torch():
    base, models, vs = _inputs()
    fp, ip = _packed(3, MODES)
    for score in (abi.SCORE_MAGNITUDE, abi.SCORE_FISHER):
        want = torch.zeros(3, 3, dtype=torch.float64)
        ops.model_stats_torch(base.cpu(), [m.cpu() for m in models], [v.cpu() for v in vs],
                              score, fp, ip, 0.5, 1000, want)
        got = torch.zeros(3, 3, dtype=torch.float64, device=DEV)
        _tk().backend().model_stats(base, models, vs, score, fp.to(DEV), ip.to(DEV), 0.5, 1000,
                                    got)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-12)


COMBINE_CASES = [  # (combine, elect, elect_on, normalize)
    ("sum", 0, 0, 0), ("sum", 0, 0, 1), ("sum", 0, 0, 2),
    ("ties", 0, 0, 1), ("ties", 1, 0, 1), ("ties", 0, 1, 2), ("ties", 1, 1, 0),
    ("consensus_sum", 0, 0, 0), ("consensus_ties", 0, 0, 1), ("ota", 0, 0, 0),
    ("linear", 0, 0, 1), ("linear", 0, 0, 0),
]


@pytest.mark.parametrize("combine,elect,elect_on,normalize", COMBINE_CASES)
def test_fused_merge_matches_torch_kernel(combine, elect, elect_on, normalize):
    """The Triton fused kernel against ops.fused_merge_torch on every mode mix (band, DARE,
    keep-all, keep-none) with non-trivial weights, rescales and OTA scales."""
    base, models, vs = _inputs((41, 23), 4, seed=1)
    fp, ip = _packed(4, MODES)
    cid = COMBINE_IDS[combine]
    args = (cid, abi.SCORE_FISHER if combine == "ota" else abi.SCORE_MAGNITUDE, elect,
            elect_on, normalize, 2, 0.8 if combine != "linear" else 1.0, 0.5, 1e-8, 77,
            torch.float32)
    nf_want = torch.zeros(4, dtype=torch.int64)
    want = ops.fused_merge_torch(base.cpu(), [m.cpu() for m in models], [v.cpu() for v in vs],
                                 fp, ip, *args, nf_want)
    nf = torch.zeros(4, dtype=torch.int64, device=DEV)
    got = _tk().backend().fused_merge(base, models, vs, fp.to(DEV), ip.to(DEV), *args, nf)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(nf.cpu(), nf_want)
    # float32 in a different order: within a few ulp of the magnitudes involved
    scale = sum(m.cpu().float().abs() for m in models) + base.cpu().float().abs()
    err = (got.cpu() - want).abs()
    bad = err > 1e-6 * scale + 1e-30
    if combine in ("ties", "consensus_ties", "consensus_sum"):
        # election / consensus decisions at float32 ties may differ: allow a handful
        assert int(bad.sum()) <= 2, int(bad.sum())
    else:
        assert not bad.any(), f"{int(bad.sum())} elements differ, max err {err.max()}"


def test_nonfinite_counted():
    base, models, vs = _inputs((40,), 2)
    models[1][3] = float("nan")
    models[1][7] = float("inf")
    models[0][0] = float("-inf")
    fp, ip = _packed(2, [abi.MODE_KEEP_ALL] * 2)
    for combine in ("sum", "ties", "linear"):
        nf = torch.zeros(2, dtype=torch.int64, device=DEV)
        _tk().backend().fused_merge(base, models, [], fp.to(DEV), ip.to(DEV),
                                    COMBINE_IDS[combine], 0, 0, 0, 1, 2, 1.0, 0.5, 1e-8, 0,
                                    torch.bfloat16, nf)
        assert nf.cpu().tolist() == [1, 2], combine


# ----------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("method,params", [
    ("dare_ties", dict(density=[0.3, 0.7, 0.5], seed=9)),
    ("ties", dict(density=0.4)),
    ("ota", dict(ota_normalize="global")),
])
def test_chunked_equals_whole(method, params):
    """Merging a tensor chunk by chunk (global offsets for the DARE counters, thresholds and
    statistics planned over the chunk stream) gives exactly the whole-tensor merge."""
    from fastmerge.methods import resolve_spec
    from fastmerge.planning.plan import plan_tensor
    base, models, vs = _inputs((3001,), 3, seed=4)
    spec = resolve_spec(method, 3, **params)
    be = get_backend("triton", DEV)
    needs_v = spec.needs_second_moments
    whole = Chunk(base, models, vs if needs_v else [], 0, NAME)
    cuts = [0, 5, 1000, 1001, 2048, 3001]

    def chunks():
        return [Chunk(base[a:b], [m[a:b] for m in models], [v[a:b] for v in vs] if needs_v
                      else [], a, NAME) for a, b in zip(cuts, cuts[1:])]

    plan_w = plan_tensor(spec, lambda: [whole], be, base.numel(), NAME)
    plan_c = plan_tensor(spec, chunks, be, base.numel(), NAME)
    assert torch.equal(plan_w.fparams, plan_c.fparams) or method == "ota"
    torch.testing.assert_close(plan_w.fparams, plan_c.fparams, rtol=1e-6, atol=0)
    out_w, _ = be.merge(whole, plan_w, torch.float32)
    out_c = torch.cat([be.merge(c, plan_w, torch.float32)[0] for c in chunks()])
    assert torch.equal(out_w, out_c)


# ----------------------------------------------------------------------------- registration
def test_backend_dispatch_and_devices():
    tk = _tk()
    assert tk.availability() == (True, "")
    assert tk.default_device() == ("cuda" if HAS_CUDA else "cpu")
    assert tk.supports_device("cpu") == tk.interpreting()
    assert get_backend("triton", DEV).name == "triton"
    for op in ("triton_score_histogram", "triton_model_stats", "triton_fused_merge"):
        assert hasattr(torch.ops.fastmerge, op)


def test_more_models_than_slots_fall_back_with_a_warning():
    tk = _tk()
    n = tk.MAX_MODELS + 1
    base, models, _ = make_finetunes((20,), n, ("bf16",), seed=8)
    with pytest.warns(RuntimeWarning, match=f"at most {tk.MAX_MODELS} models"):
        out = fm.merge_tensors(base.to(DEV), [m.to(DEV) for m in models], "ties", density=0.5,
                               backend="triton", tensor_name=NAME)
    from fastmerge.testing import assert_matches_reference
    assert_matches_reference(out.cpu(), base, models, "ties", density=0.5, tensor_name=NAME)
    with pytest.raises(ValueError, match=f"at most {tk.MAX_MODELS} models"):  # the op itself
        torch.ops.fastmerge.triton_fused_merge(
            None, [m.to(DEV) for m in models], [], torch.zeros(n, 6, device=DEV),
            torch.zeros(n, 3, dtype=torch.int64, device=DEV), 1, 0, 0, 0, 0, 2, 1.0, 0.5, 1e-8,
            0, torch.float32, torch.zeros(n, dtype=torch.int64, device=DEV))


def test_many_models_and_every_dtype():
    base, models, _ = make_finetunes((129,), 32, ("bf16", "fp16", "fp32"), seed=2)
    out = fm.merge_tensors(base.to(DEV), [m.to(DEV) for m in models], "ties", density=0.5,
                           backend="triton", tensor_name=NAME)
    from fastmerge.testing import assert_matches_reference
    assert_matches_reference(out.cpu(), base, models, "ties", density=0.5, tensor_name=NAME)


def test_imports_without_triton():
    """fastmerge (and fastmerge.backends.triton) import without triton; availability says why."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import fastmerge\n"
            "from fastmerge.backends import triton as tk\n"
            "from fastmerge.backends import availability, available_backends\n"
            "ok, why = availability('triton'); assert not ok and 'triton' in why, why\n"
            "assert not tk.availability()[0]\n"
            "print(available_backends()['triton'])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(fm.__file__)))] +
        [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter is lenient; compile every kernel family for sm_90 (PTX and cubin, with
    the ptxas triton ships) so a GPU-only compile error cannot hide behind CI. Needs no GPU.
    The PTX has no fma.rn.f32 / div.full.f32: the compiled kernels round every operation like
    the interpreter, the C++ CPU and the CUDA kernels."""
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton without its NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is not importable: {exc}")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(fm.__file__)))] +
        [p for p in [os.environ.get("PYTHONPATH")] if p])
    ptx = tmp_path / "ptx"
    # --fp-fusion: triton's default contraction on (what a launch that drops the
    # enable_fp_fusion=False option, e.g. under torch.compile, would get): the kernels' own
    # mul.rn / div_rn must still keep every float32 operation rounded on its own
    res = subprocess.run([sys.executable, "-m", "fastmerge.backends.triton.compile_check",
                          "--fp-fusion", "--ptx", str(ptx)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "kernel variants compiled for sm_90" in res.stdout
    files = sorted(ptx.glob("*.ptx"))
    assert len(files) >= 16
    for f in files:
        text = f.read_text()
        assert "div.full.f32" not in text, f.name
        # libdevice powf (OTA's merge, the statistics with second moments) uses FMAs inside
        # its own <= 2 ulp algorithm; everywhere else no multiply-add may be contracted
        if "COMBINE5" not in f.name and not f.name.startswith("_model_stats_kernel"):
            assert "fma.rn.f32" not in text, f.name
    # the body launch of a split call (aligned, size % 16 == 0) loads vectors; the same
    # kernel without that specialisation (an odd size or an unaligned view) does not
    bodies = [f for f in files if f.name.endswith("-DIV16.ptx")]
    assert len(bodies) == 2
    for f in bodies:
        assert re.search(r"ld\.global(\.nc)?\.v[24]\.", f.read_text()), f.name
        plain = f.with_name(f.name.replace("-DIV16", ""))
        assert not re.search(r"ld\.global(\.nc)?\.v[24]\.", plain.read_text()), plain.name


def test_fisher_histogram_sums_are_exact():
    """The Fisher histograms add |t| as exact integer limbs: 2^60 then a thousand 1.0 in the
    same bin (score t^2 v = 1) sum to float64(2^60 + 1000); float64 adds in any order that
    starts with 2^60 give 2^60 (ulp 256), so the result depended on the order of the atomics."""
    n = 1001
    t = torch.ones(n, dtype=torch.float32)
    v = torch.ones(n, dtype=torch.float32)
    t[0], v[0] = 2.0 ** 60, 2.0 ** -120
    be = _tk().backend()
    for level in (0, 1):
        tg = torch.tensor([[0, 0x3F80 if level else 0]], dtype=torch.int64, device=DEV)
        counts = torch.zeros(1, abi.NUM_BINS, dtype=torch.int64, device=DEV)
        sums = torch.zeros(1, abi.NUM_BINS, dtype=torch.float64, device=DEV)
        be.score_histogram(None, [t.to(DEV)], [v.to(DEV)], abi.SCORE_FISHER, tg, level, counts,
                           sums)
        b = 0x3F80 if level == 0 else 0
        assert int(counts[0, b]) == n
        assert sums[0, b].item() == float(2 ** 60 + 1000), (level, sums[0, b].item())
        assert int(counts.sum()) == n


def test_launches_check_and_guard_the_device(monkeypatch):
    """Every op checks that its tensors share one device (a clear error naming the tensor) and
    launches under that device (torch.cuda.device for CUDA tensors), not the current one."""
    from fastmerge.backends.triton import _registry
    cpu = torch.zeros(3)
    with pytest.raises(ValueError, match=r"models\[1\] is on meta but base is on cpu"):
        _registry._one_device("triton_fused_merge",
                              _registry._named(cpu, [cpu, cpu.to("meta")], []))
    assert _registry._one_device("x", _registry._named(None, [cpu], [], out=cpu)) == cpu.device
    guard = _registry._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    seen = []
    real = _registry._device_guard
    monkeypatch.setattr(_registry, "_device_guard", lambda dev: seen.append(dev) or real(dev))
    base, models, vs = _inputs((50,), 2)
    fp, ip = _packed(2, MODES)
    nf = torch.zeros(2, dtype=torch.int64, device=DEV)
    _tk().backend().fused_merge(base, models, [], fp.to(DEV), ip.to(DEV), 2, 0, 0, 0, 1, 2,
                                1.0, 0.5, 1e-8, 0, torch.float32, nf)
    assert seen == [base.device]
    with pytest.raises(ValueError, match="iparams is on meta"):
        _tk().backend().fused_merge(base, models, [], fp.to(DEV), ip.to("meta"), 2, 0, 0, 0, 1,
                                    2, 1.0, 0.5, 1e-8, 0, torch.float32, nf)


def test_model_stats_are_block_order_free(monkeypatch):
    """Small blocks (many programs): the per-program partials summed by torch give the same
    bits on every run and the plain-torch statistics."""
    base, models, vs = _inputs((3000,), 3, seed=5)
    fp, ip = _packed(3, MODES)
    monkeypatch.setenv("FASTMERGE_TRITON_BLOCK", "64")
    outs = []
    for _ in range(2):
        got = torch.zeros(3, 3, dtype=torch.float64, device=DEV)
        _tk().backend().model_stats(base, models, vs, abi.SCORE_FISHER, fp.to(DEV), ip.to(DEV),
                                    0.5, 7, got)
        outs.append(got.cpu())
    assert torch.equal(outs[0], outs[1])
    want = torch.zeros(3, 3, dtype=torch.float64)
    ops.model_stats_torch(base.cpu(), [m.cpu() for m in models], [v.cpu() for v in vs],
                          abi.SCORE_FISHER, fp, ip, 0.5, 7, want)
    torch.testing.assert_close(outs[0], want, rtol=1e-6, atol=1e-12)


def test_many_models_cap_registers(monkeypatch):
    """Above 16 models the compiled merge is launched with at most 128 registers a thread
    (two resident blocks instead of one); the interpreter gets no option."""
    from fastmerge.backends.triton import _registry
    assert _registry._merge_options(32) == ({} if _tk().interpreting() else {"maxnreg": 128})
    monkeypatch.setattr(_registry, "interpreting", lambda: False)
    assert _registry._merge_options(8) == {}
    assert _registry._merge_options(32) == {"maxnreg": 128}
    assert _registry._options() == {"enable_fp_fusion": False}
    monkeypatch.setenv("FASTMERGE_TRITON_MAXNREG", "0")
    assert _registry._merge_options(32) == {}


def _opcheck_cases():
    base, models, vs = _inputs((37, 5), 3)
    fp, ip = _packed(3, MODES[:3])
    dev = base.device
    return {
        "triton_fused_merge": (base, models, vs, fp.to(dev), ip.to(dev), 2, 0, 0, 0, 1, 2, 1.0,
                               0.5, 1e-8, 5, torch.bfloat16,
                               torch.zeros(3, dtype=torch.int64, device=dev)),
        "triton_model_stats": (base, models, vs, 0, fp.to(dev), ip.to(dev), 0.5, 5,
                               torch.zeros(3, 3, dtype=torch.float64, device=dev)),
        "triton_score_histogram": (base, models, vs, 0,
                                   torch.tensor([[0, 0], [2, 0]], device=dev), 0,
                                   torch.zeros(2, abi.NUM_BINS, dtype=torch.int64, device=dev),
                                   torch.zeros(2, abi.NUM_BINS, dtype=torch.float64,
                                               device=dev)),
    }


@pytest.mark.parametrize("op_name", ["triton_fused_merge", "triton_model_stats",
                                     "triton_score_histogram"])
def test_opcheck(op_name):
    """torch.library.opcheck. Under the interpreter test_aot_dispatch_dynamic cannot run:
    wrap_triton only traces compiled (JIT) kernels into its higher-order op, and the
    interpreter's kernel object is called eagerly on the functional tensors of the trace
    (no storage). It runs on a GPU."""
    args = _opcheck_cases()[op_name]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if HAS_CUDA and not _tk().interpreting():
        utils = utils + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(getattr(torch.ops.fastmerge, op_name), args, test_utils=utils)


# ----------------------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(not HAS_CUDA or _tk().interpreting(),
                         reason="needs a CUDA device (compiled Triton kernels)")


@gpu
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "consensus_ties",
                                    "ota_ffg", "linear", "task_arithmetic"])
def test_gpu_full_size_matches_reference(method):
    from fastmerge.testing import assert_matches_reference
    params = {"ties": dict(density=0.2), "dare_ties": dict(density=0.3, seed=1),
              "breadcrumbs": dict(density=0.4, gamma=0.01), "consensus_ties": dict(density=0.3),
              "ota_ffg": dict(density=0.1), "linear": {}, "task_arithmetic": {}}[method]
    base, models, vs = make_finetunes((4096, 1024), 3, ("bf16", "bf16", "fp16"), seed=3,
                                      second_moments=True)
    out = fm.merge_tensors(base.cuda(), [m.cuda() for m in models], method,
                           second_moments=[v.cuda() for v in vs], tensor_name=NAME,
                           backend="triton", **params)
    assert_matches_reference(out.cpu(), base, models, method, second_moments=vs,
                             tensor_name=NAME, **params)


@gpu
def test_gpu_torch_compile():
    base, models, _ = make_finetunes((1 << 16,), 2, ("bf16",), seed=1, device="cuda")
    fp, ip = _packed(2, [abi.MODE_KEEP_ALL, abi.MODE_DARE])
    fp, ip = fp.cuda(), ip.cuda()

    def f(b, m0, m1, nf):
        return torch.ops.fastmerge.triton_fused_merge(b, [m0, m1], [], fp, ip, 2, 0, 0, 0, 1, 2,
                                                      1.0, 0.5, 1e-8, 0, torch.bfloat16, nf)

    nf1 = torch.zeros(2, dtype=torch.int64, device="cuda")
    nf2 = torch.zeros(2, dtype=torch.int64, device="cuda")
    eager = f(base, *models, nf1)
    compiled = torch.compile(f, fullgraph=True)(base, *models, nf2)
    assert torch.equal(eager, compiled)
    assert torch.equal(nf1, nf2)


@gpu
@pytest.mark.skipif(os.environ.get("FASTMERGE_LARGE_TESTS") != "1",
                    reason="opt-in (FASTMERGE_LARGE_TESTS=1): ~13 GiB of GPU memory")
def test_gpu_more_than_2_31_elements():
    """64-bit indexing: a 2^31 + 1000 element bf16 tensor (about 13 GB in all), DARE counters
    checked at the far end against rng."""
    n = (1 << 31) + 1000
    free = torch.cuda.mem_get_info()[0]
    if free < 6 * 2 * n:
        pytest.skip("not enough GPU memory for a > 2^31 element test")
    base = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    model = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    out = fm.merge_tensors(base, [model], "dare_linear", density=0.5, seed=5, rescale=None,
                           tensor_name=NAME, backend="triton")
    tail = out[-5000:].float().cpu() != 0
    want = rng.philox_uniform_u32(rng.dare_key(5, NAME, 0), n - 5000, 5000) < (1 << 31)
    assert torch.equal(tail, want)
    head = out[:5000].float().cpu() != 0
    assert torch.equal(head, rng.philox_uniform_u32(rng.dare_key(5, NAME, 0), 0, 5000)
                       < (1 << 31))
