"""DARE's Philox words on every CPU path against the scalar reference (fastmerge/methods/rng.py):
the word block of csrc/cpu/philox_block.cpp forced to scalar / AVX2 / AVX-512 at odd starts and
run lengths not divisible by 4, 16 or 64, and the words the AVX-512 fast merge path draws inside
its model loop (csrc/cpu/merge_avx512.h: 16 Philox lanes per 64 elements in the even/odd order,
or the word block where a chunk offset is not a multiple of 4) read back as keep bits and
compared with the scalar words and byte for byte with the generic block code."""
import pytest
import torch

from fastmerge import abi
from fastmerge.backends import availability
from fastmerge.methods import rng
from fastmerge.methods.kernel_params import COMBINE_IDS

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")
if ok:
    import fastmerge._C as C

NAME = "model.layers.0.self_attn.o_proj.weight"
DENSITY = 0.37
# starts at every residue modulo 4 and 64, and runs of counters crossing a 2^32 boundary
# (hi32 of j >> 2 changes at multiples of 2^34)
STARTS = [0, 1, 2, 3, 4, 5, 61, 64, 1000, (1 << 34) - 64, (1 << 34) - 130, (1 << 34) - 3,
          (1 << 34) + 4]


@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("start", STARTS)
def test_word_block_every_isa_matches_scalar(isa, start):
    key = rng.dare_key(3, NAME, 1)
    for count in (1, 2, 5, 15, 17, 63, 65, 127, 129, 131, 255, 257, 1000):
        got, used = C.dare_words_block(key, start, count, isa)
        assert used <= isa
        assert torch.equal(got, rng.philox_uniform_u32(key, start, count)), (isa, start, count)


def _merge(models, keys, combine, offset, fast, base=None, density=DENSITY):
    """fused_merge of bf16 models with DARE masks (weight 1, rescale 1) on the fast or generic
    block path; returns the output and the non-finite counts."""
    n = len(models)
    fp = torch.zeros(n, abi.NUM_FPARAMS, dtype=torch.float32)
    fp[:, abi.F_WEIGHT] = 1.0
    fp[:, abi.F_RESCALE] = 1.0
    thr = rng.dare_keep_threshold(density)
    ip = torch.tensor([[abi.MODE_DARE, k - (1 << 64) if k >= 1 << 63 else k, thr] for k in keys],
                      dtype=torch.int64)
    nf = torch.zeros(n, dtype=torch.int64)
    if base is None:
        base = torch.zeros_like(models[0])
    prev = C.set_merge_fast_path(fast)
    try:
        out = torch.ops.fastmerge.fused_merge(base, models, [], fp, ip, COMBINE_IDS[combine],
                                              abi.SCORE_MAGNITUDE, abi.ELECT_SUM,
                                              abi.ELECT_WEIGHTED, abi.NORMALIZE_NONE, 2, 1.0,
                                              0.5, 1e-8, offset, torch.bfloat16, nf)
    finally:
        C.set_merge_fast_path(prev)
    return out, nf


@pytest.mark.parametrize("offset", STARTS)
@pytest.mark.parametrize("numel", [32, 64, 96, 160, 512, 544, 1024 + 96, 1037])
def test_fast_path_keep_bits_match_scalar_words(offset, numel):
    """A model of ones over a zero base through the weighted sum: output 1 where the DARE word
    of element offset + k is below the threshold, else 0, on both block paths."""
    key = rng.dare_key(11, NAME, 2)
    ones = [torch.ones(numel, dtype=torch.bfloat16)]
    want = (rng.philox_uniform_u32(key, offset, numel) < rng.dare_keep_threshold(DENSITY))
    for fast in (True, False):
        out, _ = _merge(ones, [key], "sum", offset, fast)
        assert torch.equal(out.float() != 0, want), (fast, offset, numel)


@pytest.mark.parametrize("combine", ["ties", "sum"])
@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("offset", [0, 2, 4, (1 << 34) - 100])
@pytest.mark.parametrize("numel", [64, 96, 640, 4096 + 32 + 7])
def test_fast_path_equals_generic_code(combine, n, offset, numel):
    g = torch.Generator().manual_seed(n * 1000 + numel)
    b = torch.randn(numel, generator=g)
    models = [(b + 0.01 * torch.randn(numel, generator=g)).to(torch.bfloat16) for _ in range(n)]
    keys = [rng.dare_key(5, NAME, i) for i in range(n)]
    base = b.to(torch.bfloat16)
    fast, nf_fast = _merge(models, keys, combine, offset, True, base)
    slow, nf_slow = _merge(models, keys, combine, offset, False, base)
    assert torch.equal(nf_fast, nf_slow)
    assert torch.equal(fast.view(torch.int16), slow.view(torch.int16))


@pytest.mark.parametrize("density", [0.0, 1.0, 1e-9, 0.999999])
def test_fast_path_threshold_edges(density):
    """Thresholds 0 (drop all), 2^32 (keep all) and the extremes in between."""
    key = rng.dare_key(1, NAME, 0)
    ones = [torch.ones(640, dtype=torch.bfloat16)]
    want = rng.philox_uniform_u32(key, 8, 640) < rng.dare_keep_threshold(density)
    for fast in (True, False):
        out, _ = _merge(ones, [key], "sum", 8, fast, density=density)
        assert torch.equal(out.float() != 0, want), (fast, density)
