"""rescale="l1"'s statistics pass (model_stats) on the AVX-512 block of csrc/cpu/stats_avx512.cpp,
which draws the DARE keep decisions with the merge pass's fused Philox: the same float64 sums
bit for bit as the generic block code (forced with set_merge_fast_path(False)) over dtypes,
sizes not divisible by 4 / 16 / 32 / 64, offsets inside a Philox counter's group of four and
across a 2^32 counter boundary, the density edges, magnitude bands, all-zero and non-finite
task vectors; fastmerge._core the same as fastmerge._C; and the sums and rescale factors of
chunked tensors as the reference's (fastmerge/reference.py)."""
import pytest
import torch
from helpers import make_finetunes

from fastmerge import abi, reference
from fastmerge.backends import availability, get_backend
from fastmerge.methods import resolve_spec, rng
from fastmerge.pipeline import native
from fastmerge.planning.plan import plan_tensor
from fastmerge.planning.selection import Chunk

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")
if ok:
    import fastmerge._C as C

NAME = "model.layers.3.mlp.up_proj.weight"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CODES = {torch.float32: abi.DTYPE_FLOAT32, torch.bfloat16: abi.DTYPE_BFLOAT16,
         torch.float16: abi.DTYPE_FLOAT16}
# 0: drop all; 2^32: keep all; between them the word < threshold test at its extremes
THRESHOLDS = [0, 1, 2**31, 2**32 - 1, 2**32]
# counters crossing 2^32 (hi32 of j >> 2 changes at multiples of 2^34)
OFFSETS = [0, 1, 2, 3, 4, 60, (1 << 34) - 100, (1 << 34) - 3]
# n = 1, odd sizes, 32 / 64 / 128-element steps with tails, two work items (kChunk = 65536)
SIZES = [1, 3, 31, 32, 33, 64, 96, 160, 513, 1037, 65536 + 96 + 5]


def _rows(keys, thr, mode=abi.MODE_DARE, lo=0.0, hi=float("inf")):
    n = len(keys)
    fp = torch.zeros(n, abi.NUM_FPARAMS, dtype=torch.float32)
    fp[:, abi.F_WEIGHT] = 1.0
    fp[:, abi.F_RESCALE] = 1.0
    fp[:, abi.F_LO] = lo
    fp[:, abi.F_HI] = hi
    ip = torch.zeros(n, abi.NUM_IPARAMS, dtype=torch.int64)
    ip[:, abi.I_MODE] = mode
    for i, k in enumerate(keys):
        ip[i, abi.I_DARE_KEY] = k - (1 << 64) if k >= 1 << 63 else k
        ip[i, abi.I_DARE_THRESHOLD] = thr
    return fp, ip


def _stats(base, models, fp, ip, offset, fast):
    """torch.ops.fastmerge.model_stats on the AVX-512 block (fast) or the generic code."""
    out = torch.zeros(len(models), 3, dtype=torch.float64)
    prev = C.set_merge_fast_path(fast)
    try:
        torch.ops.fastmerge.model_stats(base, models, [], abi.SCORE_MAGNITUDE, fp, ip, 0.5,
                                        offset, out)
    finally:
        C.set_merge_fast_path(prev)
    return out


def _bits(x):
    return x.view(torch.int64)


def _inputs(numel, dtypes, seed, with_base=True):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(numel, generator=g)
    models = [(b + 0.01 * torch.randn(numel, generator=g)).to(dt) for dt in dtypes]
    return (b.to(dtypes[0]) if with_base else None), models


@pytest.mark.parametrize("dtypes", [("bf16",) * 3, ("fp16",) * 3, ("fp32",) * 3,
                                    ("bf16", "fp16", "fp32")])
@pytest.mark.parametrize("offset", OFFSETS)
def test_fast_block_equals_generic_code(dtypes, offset):
    dts = [DTYPES[d] for d in dtypes]
    keys = [rng.dare_key(7, NAME, i) for i in range(len(dts))]
    for numel in SIZES:
        for with_base in (True, False):
            base, models = _inputs(numel, dts, numel, with_base)
            for thr in THRESHOLDS:
                fp, ip = _rows(keys, thr)
                fast = _stats(base, models, fp, ip, offset, True)
                slow = _stats(base, models, fp, ip, offset, False)
                assert torch.equal(_bits(fast), _bits(slow)), (numel, with_base, thr)


def test_magnitude_bands_and_keep_modes():
    """Band keeps (breadcrumbs / magnitude_prune with rescale l1), keep-all and keep-none rows."""
    base, models = _inputs(4096 + 32 + 7, [torch.bfloat16, torch.float32, torch.float16], 3)
    keys = [rng.dare_key(1, NAME, i) for i in range(3)]
    for lo, hi in ((0.005, float("inf")), (0.002, 0.02), (0.0, 0.0), (1.0, 2.0)):
        fp, ip = _rows(keys, 0, abi.MODE_BAND, lo, hi)
        ip[2, abi.I_MODE] = abi.MODE_KEEP_ALL
        ip[1, abi.I_MODE] = abi.MODE_KEEP_NONE
        for offset in (0, 5):
            fast = _stats(base, models, fp, ip, offset, True)
            assert torch.equal(_bits(fast), _bits(_stats(base, models, fp, ip, offset, False)))
            assert fast[1, 1] == 0 and fast[2, 0] == fast[2, 1]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 100, 700, 1030])
def test_non_finite_task_vectors(value, where):
    """A block with a NaN/Inf |t| (a dropped Inf adds |Inf * 0| = NaN to the kept sum) goes to
    the generic code, and so do the blocks after it: the same bits either way."""
    base, models = _inputs(1037, [torch.bfloat16] * 2, 9)
    models[1][where] = value
    keys = [rng.dare_key(2, NAME, i) for i in range(2)]
    for thr in (0, 2**31, 2**32):
        fp, ip = _rows(keys, thr)
        fast = _stats(base, models, fp, ip, 0, True)
        assert torch.equal(_bits(fast), _bits(_stats(base, models, fp, ip, 0, False)))
        assert not fast[1, 0].isfinite() and fast[0, :2].isfinite().all()


def test_all_zero_task_vectors():
    base = torch.randn(2000).to(torch.bfloat16)
    models = [base.clone(), base.clone()]
    fp, ip = _rows([rng.dare_key(3, NAME, i) for i in range(2)], 2**31)
    for fast in (True, False):
        assert torch.equal(_stats(base, models, fp, ip, 4, fast)[:, :2], torch.zeros(2, 2))


def test_thread_count_does_not_change_the_sums():
    base, models = _inputs(3 * 65536 + 99, [torch.bfloat16] * 3, 5)
    fp, ip = _rows([rng.dare_key(4, NAME, i) for i in range(3)], 2**31 + 12345)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _stats(base, models, fp, ip, 8, True)
        torch.set_num_threads(2)
        two = _stats(base, models, fp, ip, 8, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(one), _bits(two))


@pytest.mark.skipif(ok and native._core() is None, reason="fastmerge._core is not built")
@pytest.mark.parametrize("offset", [0, 2, (1 << 34) - 100])
def test_core_equals_torch_op(offset):
    """fastmerge._core.model_stats (the native pipeline's) = fastmerge._C's, bit for bit."""
    core = native._core()
    base, models = _inputs(65536 + 1037, [torch.bfloat16, torch.float16, torch.float32], 6)
    keys = [rng.dare_key(8, NAME, i) for i in range(3)]

    def mv(t):
        return memoryview(t.contiguous().view(torch.uint8).numpy())
    for thr in (0, 2**31, 2**32):
        fp, ip = _rows(keys, thr)
        got = core.model_stats(mv(base), CODES[base.dtype], [mv(m) for m in models],
                               [CODES[m.dtype] for m in models], fp.numpy().tobytes(),
                               ip.numpy().tobytes(), 0.5, offset, base.numel(), 2)
        want = _stats(base, models, fp, ip, offset, False)
        assert torch.equal(_bits(torch.tensor(got, dtype=torch.float64).view(3, 3)),
                           _bits(want))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(1,), (7, 9), (513, 131)])
def test_chunked_sums_and_rescale_factors_match_reference(dtype, shape):
    """Backend "cpu"'s plan over chunks cut at offsets not divisible by 4: the L1 sums within
    float64 summation order of the reference's, and the float32 rescale factors equal."""
    n = 3
    base, models, _ = make_finetunes(shape, n, (dtype,), seed=21)
    spec = resolve_spec("dare_ties", n, density=[0.2, 0.5, 0.9], seed=4, rescale="l1")
    flat_b, flat_m = base.reshape(-1), [m.reshape(-1) for m in models]
    numel = base.numel()
    cuts = sorted({0, numel // 3 + 1, numel // 2 + 2, numel})
    chunks = [Chunk(flat_b[s:e], [m[s:e] for m in flat_m], [], s, NAME)
              for s, e in zip(cuts[:-1], cuts[1:])]
    plan = plan_tensor(spec, lambda: chunks, get_backend("cpu", "cpu"), numel, NAME)
    t32 = reference.task_vectors(flat_b, flat_m, torch.float32, NAME)
    keep, _ = reference.keep_masks(spec, t32, None, NAME)
    want = torch.tensor(reference.rescale_factors(spec, t32, keep), dtype=torch.float32)
    assert torch.equal(plan.fparams[:, abi.F_RESCALE], want)
    # the sums themselves, whole tensor, against the reference masks' float64 sums
    fp, ip = plan.fparams.clone(), plan.iparams.clone()
    got = _stats(flat_b, flat_m, fp, ip, 0, True)
    a = t32.abs().double()
    torch.testing.assert_close(got[:, 0], a.sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(got[:, 1], (a * keep).sum(1), rtol=1e-12, atol=0)
