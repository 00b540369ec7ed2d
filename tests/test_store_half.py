"""The float16 output store (csrc/cpu/store_half.cpp: VCVTPS2PH on AVX-512 or F16C, the scalar
fm_float_to_half as fallback) against the scalar routine (_C.round_to) and torch's conversion,
bit for bit, over a structured set of float32 values (every exponent and sign x mantissas with
the rounding bit of every position set, cleared, tied and just off the tie; +-0, float32
subnormals, Inf, quiet and signalling NaNs with payloads), through the fused merge's real store:
the generic block code and the AVX-512 block path (set_merge_fast_path), every conversion the
CPU has (set_store_half_isa), and the NaN/Inf count the store takes."""
import pytest
import torch

from fastmerge import abi
from fastmerge.backends import availability
from fastmerge.methods.kernel_params import COMBINE_IDS

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")
if ok:
    import fastmerge._C as C

ISAS = [0, 1, 2]  # scalar, F16C, the best this CPU has (a missing ISA falls back)


def _mantissas():
    """Mantissas whose rounding to 10 bits (normal halves) or fewer (subnormal halves: the
    rounding bit moves down to bit 23) is a tie, just below or above one, at every position."""
    ms = {0, 1, 2, 3, 0x7FFFFF, 0x7FFFFE, 0x400000, 0x400001, 0x200000, 0x1FFFFF}
    for p in range(23):
        bit = 1 << p
        for m in (bit, bit - 1, bit + 1, bit | (bit << 1), (bit | (bit << 1)) - 1,
                  (bit | (bit << 1)) + 1, 0x7FFFFF & ~(bit - 1), (0x7FFFFF & ~(2 * bit - 1)) | bit):
            ms.add(m & 0x7FFFFF)
    g = torch.Generator().manual_seed(0)
    ms.update(torch.randint(0, 1 << 23, (48,), generator=g).tolist())
    return sorted(ms)


def structured_bits():
    """int32 bit patterns: both signs x all 256 exponents x _mantissas (exponent 255: Inf and
    NaNs, signalling and quiet, with payloads)."""
    m = torch.tensor(_mantissas(), dtype=torch.int64)
    e = torch.arange(256, dtype=torch.int64)
    x = (e[:, None] << 23 | m[None, :]).flatten()
    x = torch.cat([x, x | (1 << 31)])
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _merge(models, out_dtype, fast, isa, scale=1.0, combine="sum"):
    """One-model weighted sum (weight 1, no base, every element kept): out = scale * m."""
    n = len(models)
    f = torch.zeros(n, abi.NUM_FPARAMS)
    i = torch.zeros(n, abi.NUM_IPARAMS, dtype=torch.int64)
    f[:, abi.F_HI] = float("inf")
    f[:, abi.F_WEIGHT] = 1.0
    f[:, abi.F_RESCALE] = 1.0
    i[:, abi.I_MODE] = abi.MODE_KEEP_ALL
    old_fast, old_isa = C.set_merge_fast_path(fast), C.set_store_half_isa(isa)
    try:
        nonfinite = torch.zeros(n, dtype=torch.int64)
        out = torch.ops.fastmerge.fused_merge(
            None, models, [], f, i, COMBINE_IDS[combine], abi.SCORE_MAGNITUDE, abi.ELECT_SUM,
            abi.ELECT_WEIGHTED, abi.NORMALIZE_NONE, 0, scale, 1.0, 0.0, 0, out_dtype, nonfinite)
    finally:
        C.set_merge_fast_path(old_fast)
        C.set_store_half_isa(old_isa)
    return out


def _h(x):
    return x.view(torch.int16)


def _torch_half(x32):
    """torch's float32 -> float16 on the finite values and Inf; NaNs as the scalar routine
    (quiet bit set, top 10 payload bits kept), whatever torch's own NaN bits are."""
    return x32.to(torch.float16)


def _assert_half_matches(out32, out16):
    """out16 = the scalar routine's rounding of out32, bit for bit, and torch's for non-NaN."""
    ref = C.round_to(out32, torch.float16)
    bad = (_h(out16) != _h(ref)).nonzero().flatten()
    assert bad.numel() == 0, [(hex(out32[k:k + 1].view(torch.int32).item() & 0xFFFFFFFF),
                               hex(out16[k:k + 1].view(torch.int16).item() & 0xFFFF),
                               hex(ref[k:k + 1].view(torch.int16).item() & 0xFFFF))
                              for k in bad[:5].tolist()]
    num = ~out32.isnan()
    assert torch.equal(_h(out16)[num], _h(_torch_half(out32))[num])


def _half_nonfinite(out16):
    return int((~out16.isfinite()).sum())


def test_scalar_routine_is_torchs_conversion():
    x = structured_bits().view(torch.float32)
    ref = C.round_to(x, torch.float16)
    num = ~x.isnan()
    assert torch.equal(_h(ref)[num], _h(x.to(torch.float16))[num])
    # NaN: quiet bit set, sign and the top 10 payload bits kept
    xb = structured_bits()[~num].to(torch.int64) & 0xFFFFFFFF
    want = ((xb >> 16) & 0x8000) | 0x7E00 | ((xb >> 13) & 0x3FF)
    assert torch.equal(_h(ref)[~num].to(torch.int64) & 0xFFFF, want)


@pytest.mark.parametrize("isa", ISAS)
def test_generic_store_every_float32_pattern(isa):
    """float32 models: the generic code stores m itself (1 * m + 0 keeps every bit but -0)."""
    x = structured_bits().view(torch.float32)
    out32 = _merge([x], torch.float32, False, 0)
    finite = x.isfinite() & (x != 0)
    assert torch.equal(out32[finite].view(torch.int32), x[finite].view(torch.int32))
    assert torch.equal(out32.isnan(), x.isnan())
    for numel in (x.numel(), 1, 15, 17, 511, 513):  # SIMD tails
        out16 = _merge([x[:numel]], torch.float16, False, isa)
        _assert_half_matches(out32[:numel], out16)


def _fast_scales():
    """scales 1 + 2^-p (+- an ulp, or with the bit above): scale * 2^k is a tie (or just off
    one) of both normal and subnormal halves at every exponent."""
    s = [1.0, 1.5, 1.9999999, 65504.0 / 2**15, 65520.0 / 2**15, 65519.996 / 2**15]
    for p in range(1, 24):
        for v in (1 + 2.0**-p, 1 + 3 * 2.0**-p, 1 + 2.0**-p + 2.0**-23, 1 + 2.0**-p - 2.0**-23):
            s.append(float(torch.tensor(v, dtype=torch.float32)))
    return sorted(set(s))


def _all_bf16_finite():
    b = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return b[b.isfinite()]


@pytest.mark.parametrize("fast", [True, False])
def test_block_path_store_ties_and_overflow(fast):
    """bf16 models (the AVX-512 block path's inputs): out = scale * m over every finite bf16 m
    and the _fast_scales, stored by each conversion, against the float32 output rounded."""
    m = _all_bf16_finite()
    for scale in _fast_scales():
        out32 = _merge([m], torch.float32, fast, 0, scale)
        for isa in ISAS:
            out16 = _merge([m], torch.float16, fast, isa, scale)
            _assert_half_matches(out32, out16)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("isa", ISAS)
def test_store_count_of_nonfinite_halves(fast, isa):
    """The store's NaN/Inf count (the pipeline's check of a float16 output) under each
    conversion: float32 results either side of the bound 65520, and bf16 models (the AVX-512
    block path where it applies) that overflow float16 only, at block
    boundaries, in a full block and in a tail."""
    from test_store_nonfinite import _core_merge, _pass_over

    from fastmerge.pipeline.native import core
    lib = core()  # _core holds its own copy of the kernels and of their switches
    if lib is None:
        pytest.skip("fastmerge._core is not built")
    below = torch.tensor(65520.0).nextafter(torch.tensor(0.0)).item()
    cases = [(torch.float32, v) for v in (below, 65520.0, -65520.0, 65504.0)]
    cases += [(torch.bfloat16, v) for v in (65280.0, 65536.0, 3e38)]
    for dtype, value in cases:
        m = torch.full((1100,), 0.5, dtype=torch.float32)
        at = [0, 31, 32, 511, 512, 1023, 1024, 1099]
        m[at] = value
        base, model = torch.zeros(1100, dtype=dtype), m.to(dtype)
        old_fast, old_isa = lib.set_merge_fast_path(fast), lib.set_store_half_isa(isa)
        try:
            out, data = _core_merge("task_arithmetic", base, [model], "F16")
        finally:
            lib.set_merge_fast_path(old_fast)
            lib.set_store_half_isa(old_isa)
        want = None if abs(value) < 65520 else (len(at), 0)
        assert out.nonfinite == _pass_over(data, "F16") == want, (dtype, value)
        written = torch.frombuffer(bytearray(data), dtype=torch.float16)
        assert torch.equal(_h(written), _h(C.round_to(model.float(), torch.float16)))


def test_store_half_isa_switch():
    """set_store_half_isa (in _C and in _core) returns the previous setting (2 by default)."""
    from fastmerge.pipeline.native import core
    for lib in (C, core()):
        if lib is not None:
            assert lib.set_store_half_isa(0) == 2
            assert lib.set_store_half_isa(2) == 0


def test_flush_denormal_does_not_change_the_halves():
    """torch.set_flush_denormal (MXCSR FTZ and DAZ on this thread) flushes float32 subnormals
    only: half subnormals are float32 normals, and VCVTPS2PH ignores FTZ. A small output is
    merged on the calling thread."""
    x = structured_bits().view(torch.float32)
    x = x[(x.abs() >= 2.0**-26) & (x.abs() < 2.0**-13)][:4000]  # the half-subnormal range
    want = C.round_to(x, torch.float16)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no FTZ/DAZ")
    try:
        for isa in ISAS:
            for k in range(0, x.numel(), 500):
                out16 = _merge([x[k:k + 500]], torch.float16, False, isa)
                assert torch.equal(_h(out16), _h(want[k:k + 500])), isa
    finally:
        torch.set_flush_denormal(False)
