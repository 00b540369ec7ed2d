"""CPU-backend specific tests of the C++ kernels (fastmerge._C): the shared header's enums,
Philox and dtype rounding against Python/torch, thread-count and chunking invariance, DARE masks
at odd sizes, mixed dtypes, the raw ops against their plain-torch definitions, and opcheck.
The generic conformance suite (tests/test_ops.py) also runs against ``cpu``."""
import os

import pytest
import torch
from helpers import make_finetunes
from test_rng import DARE_V2_KAT, DARE_V2_KEEP, KAT_DENSITY

import fastmerge as fm
from fastmerge import abi
from fastmerge.backends import availability, get_backend, ops
from fastmerge.methods import resolve_spec, rng
from fastmerge.methods.kernel_params import COMBINE_IDS
from fastmerge.planning.plan import plan_tensor
from fastmerge.planning.selection import Chunk, level0
from fastmerge.testing import assert_matches_reference

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")
if ok:
    import fastmerge._C as C

NAME = "model.layers.3.mlp.up_proj.weight"


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_header_enums_match_ops():
    e = C.enums()
    for name in ("MODE_KEEP_ALL", "MODE_BAND", "MODE_KEEP_NONE", "MODE_DARE", "SCORE_MAGNITUDE",
                 "SCORE_FISHER", "ELECT_SUM", "ELECT_COUNT", "ELECT_WEIGHTED", "ELECT_UNWEIGHTED",
                 "NORMALIZE_NONE", "NORMALIZE_WEIGHTS", "NORMALIZE_COUNT", "F_WEIGHT", "F_RESCALE",
                 "F_LO", "F_HI", "F_CONSENSUS_LAMBDA", "F_OTA_SCALE", "I_MODE", "I_DARE_KEY",
                 "I_DARE_THRESHOLD", "NUM_FPARAMS", "NUM_IPARAMS", "RADIX_BITS", "NUM_BINS",
                 "NONFINITE_BIN"):
        assert e[name] == getattr(abi, name), name
    for combine, idx in COMBINE_IDS.items():
        assert e[f"COMBINE_{combine.upper()}"] == idx, combine
    assert e["NUM_COMBINES"] == len(COMBINE_IDS)


def test_philox_known_answers():
    # Random123 kat_vectors for philox4x32_10
    assert C.philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert C.philox4x32_10([m] * 4, [m, m]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert C.philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
                           [0xA4093822, 0x299F31D0]) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420,
                                                         0x24126EA1]


@pytest.mark.parametrize("start", [0, 12345, (1 << 32) - 7, (1 << 34) - 6, (1 << 40) + 3])
def test_philox_stream_and_keys_match_python(start):
    key = rng.dare_key(2**63 + 5, NAME, 2)
    assert C.dare_key(2**63 + 5, NAME, 2) == key
    assert C.dare_key(0, "", 0) == rng.dare_key(0, "", 0)
    assert C.dare_key(7, "é.ü", 31) == rng.dare_key(7, "é.ü", 31)
    got = C.dare_words(key, start, 4099)
    assert torch.equal(got, rng.philox_uniform_u32(key, start, 4099))


@pytest.mark.parametrize("start", [0, 1, 2, 3, 12345, (1 << 32) - 7, (1 << 34) - 100,
                                   (1 << 34) - 61, (1 << 40) + 3, (1 << 48) - 9])
@pytest.mark.parametrize("isa", [0, 1, 2])
def test_philox_simd_block_matches_python(start, isa):
    """The AVX2 / AVX-512 Philox lanes of the DARE masks equal the scalar header and rng.py at
    every start modulo 4 and run length, also where a run of counters crosses a 2^32 boundary
    (hi32 of the counter j >> 2 changes mid-vector: j near a multiple of 2^34)."""
    key = rng.dare_key(7, NAME, 1)
    for count in (1037, 64, 3, 0):
        got, used = C.dare_words_block(key, start, count, isa)
        assert used <= isa
        want = rng.philox_uniform_u32(key, start, count)
        assert torch.equal(got, want), count
        assert torch.equal(got, C.dare_words(key, start, count))


def _keep_via_merge(j, key, dtype, fast):
    """The DARE keep bit of element j from one fused_merge (weighted sum, a model of ones over
    a zero base) of a 96-element chunk whose global offset puts j at position 35."""
    at = min(j, 35)
    base = torch.zeros(96, dtype=dtype)
    fp = torch.zeros(1, abi.NUM_FPARAMS, dtype=torch.float32)
    fp[0, abi.F_WEIGHT] = 1.0
    fp[0, abi.F_RESCALE] = 1.0
    ip = torch.tensor([[abi.MODE_DARE, key - (1 << 64) if key >= 1 << 63 else key,
                        rng.dare_keep_threshold(KAT_DENSITY)]], dtype=torch.int64)
    nf = torch.zeros(1, dtype=torch.int64)
    prev = C.set_merge_fast_path(fast)
    try:
        out = torch.ops.fastmerge.fused_merge(base, [torch.ones(96, dtype=dtype)], [], fp, ip,
                                              COMBINE_IDS["sum"], 0, 0, 0, 0, 2, 1.0, 0.5,
                                              1e-8, j - at, dtype, nf)
    finally:
        C.set_merge_fast_path(prev)
    return bool(out[at] != 0)


@pytest.mark.parametrize("dtype,fast", [(torch.bfloat16, True), (torch.bfloat16, False),
                                        (torch.float32, False)])
def test_dare_v2_known_answers(dtype, fast):
    """semantics v2's known DARE words (tests/test_rng.py) from the header, every SIMD path and the
    fused merge (AVX-512 block path and generic code) at chunk offsets not divisible by 4."""
    for (seed, name, i, j, word), keep in zip(DARE_V2_KAT, DARE_V2_KEEP):
        key = C.dare_key(seed, name, i)
        assert int(C.dare_words(key, j, 1)[0]) == word
        for isa in (0, 1, 2):
            for before in (0, 1, 3, 6):
                b = min(before, j)
                got, _ = C.dare_words_block(key, j - b, 70, isa)
                assert int(got[b]) == word, (isa, before)
        assert _keep_via_merge(j, key, dtype, fast) == keep, (seed, name, i, j)


def _special_floats():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200000,), generator=g, dtype=torch.int64)
    rand = bits.to(torch.int32).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 2.0**-24,
                          2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-26, 2.0**-14, 2.0**-14 * 0.999,
                          6.1e-5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 3.4e38, -3.4e38,
                          float("inf"), -float("inf"), float("nan"), 1.00390625, 1.01171875])
    # bf16/fp16 halfway cases and their neighbours
    near = torch.arange(-3000, 3000, dtype=torch.int32) * 4096 + 0x3F800000
    mids = torch.cat([near, near + 1, near - 1, near + 0x8000, near + 0x7FFF]).view(torch.float32)
    sub = (torch.arange(0, 1 << 14, dtype=torch.int32) * 4096 + 0x33000000 - (1 << 20))
    return torch.cat([rand, edges, mids, sub.view(torch.float32)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_and_loads_match_torch(dtype):
    x = _special_floats()
    got, want = C.round_to(x, dtype), x.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    got, want = C.load_float(every), every.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def _merge(method, base, models, vs=None, backend="cpu", **params):
    return fm.merge_tensors(base, models, method, second_moments=vs, tensor_name=NAME,
                            backend=backend, **params)


CASES = [
    ("ties", dict(density=[0.2, 0.5, 0.9], weights=[1.0, 0.5, 0.75])),
    ("dare_ties", dict(density=[0.3, 0.6, 0.8], seed=3)),
    ("breadcrumbs_ties", dict(density=0.4, gamma=[0.0, 0.05, 0.2])),
    ("consensus_ties", dict(density=0.5, consensus_k=2)),
    ("ota_ffg", dict(density=0.3, ota_normalize="global")),
    ("dare_linear", dict(density=0.4, seed=7, rescale="l1")),
    ("linear", dict(weights=[0.5, 1.0, 2.0])),
]


def test_one_and_two_threads_identical(threads):
    base, models, vs = make_finetunes((100003,), 3, ("bf16", "fp16", "fp32"), seed=1,
                                      second_moments=True)
    for method, params in CASES:
        torch.set_num_threads(1)
        one = _merge(method, base, models, vs, **params)
        torch.set_num_threads(2)
        two = _merge(method, base, models, vs, **params)
        assert torch.equal(one.view(torch.int16), two.view(torch.int16)), method
    targets = torch.tensor([[0, 0], [1, 0], [2, 0]])
    res = []
    for nt in (1, 2):
        torch.set_num_threads(nt)
        for score in (abi.SCORE_MAGNITUDE, abi.SCORE_FISHER):
            counts = torch.zeros(3, abi.NUM_BINS, dtype=torch.int64)
            sums = torch.zeros(3, abi.NUM_BINS, dtype=torch.float64)
            torch.ops.fastmerge.score_histogram(base, models, vs, score, targets, 0, counts, sums)
            res.append((counts, sums))
    for (c1, s1), (c2, s2) in zip(res[:2], res[2:]):
        assert torch.equal(c1, c2)
        torch.testing.assert_close(s1, s2, rtol=1e-12, atol=0)
    # the statistics pass sums per work item, in item order: bitwise the same on any threads
    f = torch.tensor([[1.0, 1.0, 0.0, float("inf"), 1.0, 1.0]] * 3)
    i = torch.tensor([[abi.MODE_DARE, 12345, 1 << 31], [abi.MODE_BAND, 0, 0],
                      [abi.MODE_KEEP_ALL, 0, 0]])
    stats = []
    for nt in (1, 2):
        torch.set_num_threads(nt)
        out = torch.zeros(3, 3, dtype=torch.float64)
        torch.ops.fastmerge.model_stats(base, models, vs, abi.SCORE_MAGNITUDE, f, i, 0.5, 7, out)
        stats.append(out)
    assert torch.equal(stats[0], stats[1])


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**64 - 1])
def test_dare_masks_large_odd_size(seed):
    n = 100003
    t = torch.randn(n).to(torch.bfloat16)
    t[t == 0] = 1
    for density in (0.1, 0.5, 0.93):
        out = _merge("dare_linear", torch.zeros_like(t), [t], density=density, seed=seed,
                     rescale=None, out_dtype=torch.float32)
        want = rng.dare_mask((n,), density, seed, NAME, 0)
        assert torch.equal(out != 0, want), (seed, density)


def _chunks(base, models, vs, bounds):
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.append(Chunk(base[a:b], [m[a:b] for m in models], [v[a:b] for v in vs] if vs else [],
                         a, NAME))
    return out


@pytest.mark.parametrize("method,params", [
    ("ties", dict(density=0.3)),
    ("dare_ties", dict(density=0.4, seed=5)),
    ("breadcrumbs_ties", dict(density=0.3, gamma=0.05)),
    ("magnitude_prune", dict(density=0.2, rescale="l1")),
    ("ota_ffg", dict(density=0.25, ota_normalize="global")),
])
def test_chunked_equals_whole(method, params):
    n = 100003
    base, models, vs = make_finetunes((n,), 3, ("bf16", "fp16"), seed=2, second_moments=True)
    spec = resolve_spec(method, 3, **params)
    if not spec.needs_second_moments:
        vs = None
    be = get_backend("cpu", "cpu")
    whole = [Chunk(base, models, vs or [], 0, NAME)]
    chunks = _chunks(base, models, vs, [0, 1, 4097, 50000, 50001, n])
    plan_w = plan_tensor(spec, lambda: whole, be, n, NAME)
    plan_c = plan_tensor(spec, lambda: chunks, be, n, NAME)
    assert torch.equal(plan_w.fparams, plan_c.fparams) or torch.allclose(
        plan_w.fparams, plan_c.fparams, rtol=1e-6)
    assert torch.equal(plan_w.fparams[:, [abi.F_LO, abi.F_HI]],
                       plan_c.fparams[:, [abi.F_LO, abi.F_HI]])
    assert torch.equal(plan_w.iparams, plan_c.iparams)
    out_w, _ = be.merge(whole[0], plan_w, torch.bfloat16)
    out_c = torch.cat([be.merge(c, plan_w, torch.bfloat16)[0] for c in chunks])
    assert torch.equal(out_w.view(torch.int16), out_c.view(torch.int16))
    # level-0 histograms of the chunks add up to the whole tensor's
    for score in ((abi.SCORE_MAGNITUDE, abi.SCORE_FISHER) if vs else (abi.SCORE_MAGNITUDE,)):
        hw = level0(be, 3, score, lambda: whole)
        hc = level0(be, 3, score, lambda: chunks)
        assert torch.equal(hw.counts, hc.counts)
        torch.testing.assert_close(hw.sums, hc.sums, rtol=1e-12, atol=0)


def _histograms_match_torch(base, models, vs, score, targets, level):
    """The C++ histograms of (targets, level) equal ops.score_histogram_torch's: counts
    exactly, sums to 1e-12. Returns the counts."""
    got = [torch.zeros(len(targets), abi.NUM_BINS, dtype=torch.int64),
           torch.zeros(len(targets), abi.NUM_BINS, dtype=torch.float64)]
    want = [x.clone() for x in got]
    torch.ops.fastmerge.score_histogram(base, models, vs, score, targets, level, *got)
    ops.score_histogram_torch(base, models, vs, score, targets, level, *want)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=0)
    return want[0]


def test_histograms_and_stats_match_torch_kernels():
    base, models, vs = make_finetunes((3001, 7), 3, ("bf16", "fp32", "fp16"), seed=4,
                                      second_moments=True)
    vs[1] = vs[1].to(torch.bfloat16)
    targets0 = torch.tensor([[0, 0], [1, 0], [2, 0], [1, 0]])
    for score in (abi.SCORE_MAGNITUDE, abi.SCORE_FISHER):
        counts0 = _histograms_match_torch(base, models, vs, score, targets0, 0)
        # level 1 on the fullest bin of each model (and a second prefix for model 1)
        top = counts0.argmax(1)
        targets1 = torch.tensor([[0, top[0]], [1, top[1]], [2, top[2]], [1, top[1] - 1]])
        counts1 = _histograms_match_torch(base, models, vs, score, targets1, 1)
        assert counts1.sum() > 0
    spec = resolve_spec("breadcrumbs", 3, density=0.3, gamma=0.1)
    plan = plan_tensor(spec, lambda: [Chunk(base, models, vs, 0, NAME)], get_backend("torch",
                       "cpu"), base.numel(), NAME)
    f, i = plan.fparams, plan.iparams.clone()
    i[2, abi.I_MODE] = abi.MODE_DARE
    i[2, abi.I_DARE_KEY], i[2, abi.I_DARE_THRESHOLD] = -5, 2**31
    for score in (abi.SCORE_MAGNITUDE, abi.SCORE_FISHER):
        got = torch.zeros(3, 3, dtype=torch.float64)
        want = got.clone()
        torch.ops.fastmerge.model_stats(base, models, vs, score, f, i, 0.5, 17, got)
        ops.model_stats_torch(base, models, vs, score, f, i, 0.5, 17, want)
        torch.testing.assert_close(got[:, :2], want[:, :2], rtol=1e-9, atol=0)
        # sum of v^p: float32 pow may differ from torch's by an ulp per element
        torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [[0, 1, 2, 0, 1, 2], [2], [0, 1, 2, 0, 1], [1, 0],
                                  [0, 0, 1, 1, 2]])
def test_histograms_across_calls_and_work_items(threads, rows):
    """The per-thread tables persist between calls (cleared by the flush): successive calls
    with other row counts, levels and scores, over several dynamic work items, stay exact."""
    base, models, vs = make_finetunes((300007,), 3, ("bf16", "bf16", "fp32"), seed=9,
                                      second_moments=True)
    for score in (abi.SCORE_MAGNITUDE, abi.SCORE_FISHER, abi.SCORE_MAGNITUDE):
        t0 = torch.tensor([[i, 0] for i in rows])
        counts0 = _histograms_match_torch(base, models, vs, score, t0, 0)
        # consecutive rows of one model (a band's two thresholds) share its converted block
        t1 = torch.tensor([[i, max(0, int(counts0[r].argmax()) - r % 2)]
                           for r, i in enumerate(rows)])
        _histograms_match_torch(base, models, vs, score, t1, 1)


def test_mixed_dtypes_all_methods():
    base = torch.randn(4099, dtype=torch.float32)
    models = [(base + 0.01 * torch.randn(4099)).to(dt)
              for dt in (torch.bfloat16, torch.float16, torch.float32, torch.bfloat16)]
    vs = [torch.rand(4099).to(dt) * 1e-3 for dt in (torch.float32, torch.bfloat16,
                                                     torch.float16, torch.float32)]
    for method, params in CASES:
        params = {k: (v + [0.7] if isinstance(v, list) else v) for k, v in params.items()}
        for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
            out = _merge(method, base, models, vs, out_dtype=out_dtype, **params)
            assert_matches_reference(out, base, models, method, second_moments=vs,
                                     tensor_name=NAME, out_dtype=out_dtype, **params)


def test_no_base_and_election_variants():
    _, models, _ = make_finetunes((5003,), 3, ("bf16",), seed=8)
    for params in (dict(election="count"), dict(elect_on="unweighted", normalize="count"),
                   dict(normalize=False, weights=[1.0, -0.5, 2.0])):
        out = _merge("ties", None, models, density=0.4, **params)
        assert_matches_reference(out, None, models, "ties", tensor_name=NAME, density=0.4,
                                 **params)


def test_too_many_models_is_a_clear_error():
    n = C.enums()["FM_MAX_MODELS"] + 1
    xs = [torch.randn(10) for _ in range(n)]
    with pytest.raises(RuntimeError, match="FM_MAX_MODELS"):
        torch.ops.fastmerge.fused_merge(
            None, xs, [], torch.ones(n, 6), torch.zeros(n, 3, dtype=torch.int64), 1, 0, 0, 0,
            0, 2, 1.0, 0.5, 1e-8, 0, torch.float32, torch.zeros(n, dtype=torch.int64))


def test_opcheck_all_ops():
    base, models, vs = make_finetunes((257, 3), 2, ("bf16", "fp32"), seed=6, second_moments=True)
    targets = torch.tensor([[0, 0], [1, 0]])
    torch.library.opcheck(torch.ops.fastmerge.score_histogram.default, (
        base, models, vs, abi.SCORE_FISHER, targets, 0,
        torch.zeros(2, abi.NUM_BINS, dtype=torch.int64),
        torch.zeros(2, abi.NUM_BINS, dtype=torch.float64)))
    spec = resolve_spec("dare_ties", 2, density=0.5, seed=1)
    plan = plan_tensor(spec, lambda: [Chunk(base, models, [], 0, NAME)],
                       get_backend("cpu", "cpu"), base.numel(), NAME)
    torch.library.opcheck(torch.ops.fastmerge.model_stats.default, (
        base, models, vs, 0, plan.fparams, plan.iparams, 0.5, 3,
        torch.zeros(2, 3, dtype=torch.float64)))
    torch.library.opcheck(torch.ops.fastmerge.fused_merge.default, (
        base, models, [], plan.fparams, plan.iparams, *plan.op_args(), 0, torch.bfloat16,
        torch.zeros(2, dtype=torch.int64)))


@pytest.mark.skipif(os.environ.get("FASTMERGE_LARGE_TESTS") != "1",
                    reason="opt-in (FASTMERGE_LARGE_TESTS=1): needs ~14 GiB of RAM and ~1 min")
def test_more_than_2_pow_31_elements():
    """A bf16 tensor of 2^31 + 4099 elements: 64-bit indexing in the histogram, the one-pass
    top-k, the merge and the DARE counters of the CPU kernels."""
    n = (1 << 31) + 4099
    base = torch.zeros(n, dtype=torch.bfloat16)
    model = torch.ones(n, dtype=torch.bfloat16)
    model[-7:] = 3.0
    model[-1] = -2.0
    targets = torch.tensor([[0, 0]])
    counts = torch.zeros(1, abi.NUM_BINS, dtype=torch.int64)
    sums = torch.zeros(1, abi.NUM_BINS, dtype=torch.float64)
    torch.ops.fastmerge.score_histogram(base, [model], [], 0, targets, 0, counts, sums)
    assert int(counts.sum()) == n
    assert int(counts[0, 0x3F80]) == n - 7 and int(counts[0, 0x4040]) == 6
    assert int(counts[0, 0x4000]) == 1
    assert sums[0].sum().item() == float(n - 7 + 18 + 2)
    # the exact 7th largest |t| (radix selection over both levels), then the merge beyond 2^31
    assert fm.magnitude_threshold(model, 7, base=base, backend="cpu") == 2.0
    # the one-pass top-k (sampled window) over the same 2^31 + 4099 elements
    req = torch.tensor([[0, 6], [0, 7], [0, 1000], [0, n]])
    thr, kept, total, bad = torch.ops.fastmerge.topk_window(base, [model], req, True)
    assert torch.equal(thr, torch.tensor([3.0, 2.0, 1.0, 1.0]).view(torch.int32).long())
    assert kept.tolist() == [18.0, 20.0, float(n - 7 + 20), float(n - 7 + 20)]
    assert total.tolist() == [float(n - 7 + 20)] and bad.tolist() == [0]
    out = fm.merge_tensors(base, [model], "magnitude_prune", thresholds=[(3.0, float("inf"))],
                           backend="cpu", tensor_name=NAME)
    assert out[-8:].float().tolist() == [0.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.0]
    assert int(torch.count_nonzero(out)) == 6
    del out
    # TIES through the AVX-512 block path of the merge (merge_avx512.h) beyond 2^31
    out = fm.merge_tensors(base, [model], "ties", thresholds=[(2.0, float("inf"))],
                           backend="cpu", tensor_name=NAME)
    assert out[-8:].float().tolist() == [0.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, -2.0]
    assert int(torch.count_nonzero(out)) == 7
    del out
    out = fm.merge_tensors(base, [model], "dare_linear", density=0.5, seed=5, rescale=None,
                           tensor_name=NAME, backend="cpu")
    key = rng.dare_key(5, NAME, 0)
    assert torch.equal(out[-5000:].float() != 0,
                       rng.philox_uniform_u32(key, n - 5000, 5000) < (1 << 31))
    assert torch.equal(out[:5000].float() != 0, rng.philox_uniform_u32(key, 0, 5000) < (1 << 31))


def test_freed_outputs_are_reused_within_the_limit():
    """fused_merge outputs of >= 1 MiB come from the freed-output cache and return to it."""
    base, models, _ = make_finetunes((1024, 1031), 2, ("bf16", "bf16"), seed=12)
    prev = C.set_output_cache_limit(0)
    try:
        C.set_output_cache_limit(64 << 20)
        first = _merge("ties", base, models, None, density=0.3)
        ptr = first.data_ptr()
        want = first.clone()
        del first
        assert C.output_cache_bytes() == base.numel() * 2
        again = _merge("ties", base, models, None, density=0.3)
        assert again.data_ptr() == ptr and torch.equal(again, want)
        del again
        C.set_output_cache_limit(0)
        assert C.output_cache_bytes() == 0
        small = _merge("ties", base[:10], [m[:10] for m in models], None, density=0.3)
        assert C.output_cache_bytes() == 0 and small.shape == (10, 1031)
    finally:
        C.set_output_cache_limit(prev)


@pytest.mark.parametrize("n", [1, 3])
def test_dare_l1_rescale_in_chunks_at_any_offset(n):
    """rescale="l1": the statistics pass and the merge each draw the DARE masks; chunks that
    start at offsets not divisible by 4 (inside a Philox counter's group of four elements)
    give the whole tensor's statistics and output, bit for bit."""
    base, models, _ = make_finetunes((513, 1031), n, ("bf16", "fp16", "fp32"), seed=13)
    spec = resolve_spec("dare_ties", n, density=[0.3, 0.6, 0.9][:n], seed=5, rescale="l1")
    be = get_backend("cpu", "cpu")
    flat_b, flat_m = base.reshape(-1), [m.reshape(-1) for m in models]
    cuts = (0, 262145, 262146, 400003, base.numel())
    chunks = [Chunk(flat_b[s:e], [m[s:e] for m in flat_m], [], s, NAME)
              for s, e in zip(cuts[:-1], cuts[1:])]
    whole = [Chunk(flat_b, flat_m, [], 0, NAME)]
    plan = plan_tensor(spec, lambda: chunks, be, base.numel(), NAME)
    plan_w = plan_tensor(spec, lambda: whole, be, base.numel(), NAME)
    # the L1 sums differ only in float64 summation order
    torch.testing.assert_close(plan.fparams, plan_w.fparams, rtol=1e-6, atol=0)
    parts = torch.cat([be.merge(ch, plan, torch.bfloat16)[0] for ch in chunks])
    assert torch.equal(parts.view(torch.int16),
                       be.merge(whole[0], plan, torch.bfloat16)[0].view(torch.int16))
