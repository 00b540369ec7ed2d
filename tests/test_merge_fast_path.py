"""The AVX-512 block path of the CPU fused merge (csrc/cpu/merge_avx512.h: TIES with the default
election and the weighted sum over magnitude keeps or DARE masks, bf16 models, bf16 base or
none) against the
generic block code it stands in for: byte for byte the same output and the same non-finite
counts, over combines, normalisations, model counts, keep modes, weights, rescales, scales,
output dtypes, sizes with and without tails, ties at the threshold, signed zeros, subnormals,
overflows and NaN/Inf. The generic code is itself checked against the reference by
tests/test_ops.py; on a CPU without AVX-512 both runs take the generic code."""
import math

import pytest
import torch

from fastmerge import abi
from fastmerge.backends import availability
from fastmerge.methods.kernel_params import COMBINE_IDS

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")
if ok:
    import fastmerge._C as C

INF = float("inf")


def _merge(base, models, fparams, iparams, combine, normalize, scale, out_dtype, fast,
           offset=0):
    old = C.set_merge_fast_path(fast)
    try:
        nonfinite = torch.zeros(len(models), dtype=torch.int64)
        out = torch.ops.fastmerge.fused_merge(
            base, models, [], fparams, iparams, COMBINE_IDS[combine], abi.SCORE_MAGNITUDE,
            abi.ELECT_SUM, abi.ELECT_WEIGHTED, normalize, 0, scale, 1.0, 0.0, offset, out_dtype,
            nonfinite)
    finally:
        C.set_merge_fast_path(old)
    return out, nonfinite


def _bits(x):
    return x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)


def _check(base, models, fparams, iparams, combine="ties", normalize=abi.NORMALIZE_WEIGHTS,
           scale=1.0, out_dtype=torch.bfloat16, offset=0):
    fast, nf_fast = _merge(base, models, fparams, iparams, combine, normalize, scale, out_dtype,
                           True, offset)
    slow, nf_slow = _merge(base, models, fparams, iparams, combine, normalize, scale, out_dtype,
                           False, offset)
    assert torch.equal(nf_fast, nf_slow)
    assert torch.equal(_bits(fast), _bits(slow)), (combine, normalize, scale, out_dtype)
    return fast, nf_fast


def _inputs(numel, n, seed, base=True, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    b32 = torch.randn(numel, generator=g)
    models = [(b32 + scale * torch.randn(numel, generator=g)).to(torch.bfloat16)
              for _ in range(n)]
    return (b32.to(torch.bfloat16) if base else None), models


def _params(models, base, density, weights=None, rescales=None, modes=None, his=None):
    """fparams/iparams with lo = the exact k-th largest |t| (ties at the threshold)."""
    n = len(models)
    f = torch.zeros(n, abi.NUM_FPARAMS)
    i = torch.zeros(n, abi.NUM_IPARAMS, dtype=torch.int64)
    for j, m in enumerate(models):
        t = m.float() - (base.float() if base is not None else 0.0)
        k = max(1, int(density * t.numel()))
        f[j, abi.F_LO] = t.abs().flatten().kthvalue(t.numel() - k + 1).values
        f[j, abi.F_HI] = INF if his is None else his[j]
        f[j, abi.F_WEIGHT] = 1.0 if weights is None else weights[j]
        f[j, abi.F_RESCALE] = 1.0 if rescales is None else rescales[j]
        i[j, abi.I_MODE] = abi.MODE_BAND if modes is None else modes[j]
    return f, i


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("combine", ["ties", "sum"])
@pytest.mark.parametrize("normalize", [abi.NORMALIZE_NONE, abi.NORMALIZE_WEIGHTS,
                                       abi.NORMALIZE_COUNT])
def test_models_combines_normalisations(n, combine, normalize):
    base, models = _inputs(3 * 512 + 96, n, seed=n)
    f, i = _params(models, base, 0.3, weights=[1.0, 0.5, -0.25, 2.0, 1.0, 0.0, 3.0, 1.0, 0.7][:n])
    _check(base, models, f, i, combine, normalize)


@pytest.mark.parametrize("numel", [32, 512, 4099, 65536 * 2 + 32, 200_003])
@pytest.mark.parametrize("with_base", [True, False])
def test_sizes_tails_and_threads(numel, with_base):
    base, models = _inputs(numel, 3, seed=numel, base=with_base)
    f, i = _params(models, base, 0.2)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _check(base, models, f, i)
            _check(base, models, f, i, "sum", abi.NORMALIZE_COUNT)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 0.7, -2.0])
def test_output_dtypes_and_scales(out_dtype, scale):
    base, models = _inputs(2048 + 32 * 3, 4, seed=11, scale=0.3)
    f, i = _params(models, base, 0.5, rescales=[1.0, 2.5, 1.0, 0.3])
    _check(base, models, f, i, "ties", abi.NORMALIZE_WEIGHTS, scale, out_dtype)
    _check(base, models, f, i, "sum", abi.NORMALIZE_NONE, scale, out_dtype)


def test_keep_modes_and_bands():
    base, models = _inputs(4096 + 64, 5, seed=3)
    # a band with a finite hi (breadcrumbs), keep all, keep none, and a threshold of +Inf
    f, i = _params(models, base, 0.4,
                   modes=[abi.MODE_BAND, abi.MODE_KEEP_ALL, abi.MODE_KEEP_NONE, abi.MODE_BAND,
                          abi.MODE_BAND])
    f[0, abi.F_HI] = f[0, abi.F_LO] * 4
    f[4, abi.F_LO] = INF
    for combine in ("ties", "sum"):
        _check(base, models, f, i, combine)
    f[:, abi.F_LO] = 0.0  # keep every element, zeros included
    _check(base, models, f, i)


def test_ties_signed_zeros_and_cancellation():
    # all-equal inputs (every t = 0), -0 in the base, exact cancellations in the sums
    numel = 1024
    base = torch.zeros(numel, dtype=torch.bfloat16)
    base[::2] = -0.0
    same = [base.clone() for _ in range(3)]
    for lo in (0.0, 1.0):
        f, i = _params(same, base, 1.0)
        f[:, abi.F_LO] = lo
        for combine in ("ties", "sum"):
            for normalize in (abi.NORMALIZE_NONE, abi.NORMALIZE_WEIGHTS):
                _check(base, same, f, i, combine, normalize)
                _check(None, same, f, i, combine, normalize)
    # every model drops a negative t (s = t * 0 = -0) over a base of -0: the weighted sum is
    # +0 (it starts at +0), so the output is -0 + +0 = +0
    neg_zero = torch.full((numel,), -0.0, dtype=torch.bfloat16)
    small = [torch.full((numel,), -0.001 * (j + 1), dtype=torch.bfloat16) for j in range(3)]
    f, i = _params(small, neg_zero, 1.0)
    f[:, abi.F_LO] = 1.0
    for combine in ("ties", "sum"):
        out, _ = _check(neg_zero, small, f, i, combine, abi.NORMALIZE_NONE)
        assert not torch.signbit(out.float()).any()
    x = torch.full((numel,), 0.5, dtype=torch.bfloat16)
    models = [x, -x, x.clone(), -x]
    f, i = _params(models, None, 1.0, weights=[1.0, 1.0, 2.0, 2.0])
    f[:, abi.F_LO] = 0.0
    for combine in ("ties", "sum"):
        _check(None, models, f, i, combine, abi.NORMALIZE_WEIGHTS)
        _check(base, models, f, i, combine, abi.NORMALIZE_NONE)


def test_subnormals_and_overflow():
    numel = 512
    tiny = torch.full((numel,), 1e-39, dtype=torch.bfloat16)  # subnormal in float32 and bf16
    models = [tiny, -tiny * 2, tiny * 3]
    f, i = _params(models, None, 1.0)
    f[:, abi.F_LO] = 0.0
    _check(None, models, f, i)
    _check(None, models, f, i, "sum", abi.NORMALIZE_COUNT)
    big = torch.full((numel,), 3e38, dtype=torch.bfloat16)
    models = [big, big.clone(), -big]
    f, i = _params(models, None, 1.0, weights=[4.0, 4.0, 1.0])  # w * t overflows to Inf
    f[:, abi.F_LO] = 0.0
    for combine in ("ties", "sum"):
        for normalize in (abi.NORMALIZE_NONE, abi.NORMALIZE_WEIGHTS):
            out, nf = _check(None, models, f, i, combine, normalize)
            assert int(nf.sum()) == 0
    # a finite vote, an infinite disjoint sum and weight sum: Inf / Inf = NaN in the output
    t = torch.full((numel,), 1.5, dtype=torch.bfloat16)
    models = [t, -t, t.clone()]
    f, i = _params(models, None, 1.0, weights=[2e38, 2e38, 2e38])
    f[:, abi.F_LO] = 0.0
    out, _ = _check(None, models, f, i, "ties", abi.NORMALIZE_WEIGHTS)
    assert out.float().isnan().all()


@pytest.mark.parametrize("bad", [math.nan, INF, -INF])
@pytest.mark.parametrize("mode", ["kept", "dropped", "band", "none"])
def test_non_finite_values_are_counted(bad, mode):
    base, models = _inputs(4096, 3, seed=5)
    f, i = _params(models, base, 0.3)
    models[1][700] = bad
    models[2][4095] = bad
    models[0][1] = bad
    if mode == "dropped":
        f[:, abi.F_LO] = INF
    elif mode == "band":
        f[:, abi.F_HI] = f[:, abi.F_LO] * 2
    elif mode == "none":
        i[:, abi.I_MODE] = abi.MODE_KEEP_NONE
    for combine in ("ties", "sum"):
        _, nf = _check(base, models, f, i, combine)
        assert nf.tolist() == [1, 1, 1]


def test_non_bf16_inputs_take_the_generic_code():
    base, models = _inputs(2048, 3, seed=9)
    models[1] = models[1].float()
    f, i = _params(models, base, 0.3)
    _check(base, models, f, i)
    _check(base.float(), [m.float() for m in models], f, i)


def _dare(f, i, j, key, threshold):
    i[j, abi.I_MODE] = abi.MODE_DARE
    i[j, abi.I_DARE_KEY] = key
    i[j, abi.I_DARE_THRESHOLD] = threshold


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4097, (1 << 34) - 70, (1 << 40) + 2])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_dare_masks_at_any_offset(offset, n):
    """DARE keeps drawn in the block path (semantics v2 words in even/odd order) equal the generic
    code's at chunk offsets of every residue modulo 4 and across 2^32 counter boundaries."""
    base, models = _inputs(4 * 512 + 96, n, seed=20 + n)
    f, i = _params(models, base, 0.4, weights=[1.0, 0.5, -0.25, 2.0, 1.0, 0.0, 3.0, 1.0][:n],
                   rescales=[2.0, 1.0, 1.0 / 0.3, 1.25, 1.0, 2.0, 1.0, 4.0][:n])
    for j in range(n):
        _dare(f, i, j, 0x1234567 * (j + 1) - (1 << 62) * (j % 3), [1 << 31, 1288490188, 1][j % 3])
    for combine in ("ties", "sum"):
        for normalize in (abi.NORMALIZE_NONE, abi.NORMALIZE_WEIGHTS, abi.NORMALIZE_COUNT):
            _check(base, models, f, i, combine, normalize, offset=offset)
    _check(None, models, f, i, "sum", abi.NORMALIZE_NONE, 0.5, torch.float32, offset)


def test_dare_thresholds_mixed_with_bands():
    """Thresholds 0 (keeps none), 1, 2^32 - 1 and 2^32 (keeps all) beside band keeps."""
    base, models = _inputs(8192 + 32, 5, seed=31)
    f, i = _params(models, base, 0.3, rescales=[1.0, 2.0, 1.0, 0.5, 3.0])
    for j, thr in enumerate([0, 1, (1 << 32) - 1, 1 << 32]):
        _dare(f, i, j, 77 + j, thr)
    for combine in ("ties", "sum"):
        _check(base, models, f, i, combine, offset=3)


@pytest.mark.parametrize("bad", [math.nan, INF])
def test_dare_non_finite_values_are_counted(bad):
    base, models = _inputs(4096, 3, seed=6)
    f, i = _params(models, base, 0.3)
    for j in range(3):
        _dare(f, i, j, 5 + j, 1 << 31)
    models[0][2] = bad
    models[2][4000] = bad
    for combine in ("ties", "sum"):
        _, nf = _check(base, models, f, i, combine, offset=1)
        assert nf.tolist() == [1, 0, 1]
