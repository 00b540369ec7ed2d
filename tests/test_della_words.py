"""The pipeline's della pass draws its words from the CPU kernels (methods/rng.compiled_words):
the same words as the reference's torch Philox, so the same masks and outputs."""
import pytest
import torch

from fastmerge.methods import rng
from fastmerge.methods.della import della_mask
from fastmerge.pipeline.method_pass import _cpu_words

words = _cpu_words()
pytestmark = pytest.mark.skipif(words is None, reason="fastmerge._C is not built")


@pytest.mark.parametrize("start,count", [(0, 1), (3, 7), (5, 4099), (2**33 + 1, 1000)])
def test_compiled_words_equal_the_reference(start, count):
    key = rng.dare_key(7, "model.layers.0.mlp.up_proj.weight", 1)
    expected = rng.philox_uniform_u32(key, start, count)
    with rng.compiled_words(words):
        got = rng.philox_uniform_u32(key, start, count)
    assert rng._compiled_words is None
    assert torch.equal(got, expected)


def test_della_mask_is_the_same_with_compiled_words():
    torch.manual_seed(0)
    delta = torch.randn(6 * 37)
    plain = della_mask(delta, 37 * 5, 37, 0.4, 0.1, 3, "w", 0)
    with rng.compiled_words(words):
        fast = della_mask(delta, 37 * 5, 37, 0.4, 0.1, 3, "w", 0)
    assert torch.equal(plain, fast)
