"""Philox4x32-10 against the published Random123 known-answer vectors, the semantics v2 DARE word
(word j & 3 of counter j >> 2) against known answers, and the DARE key rules."""
import pytest
import torch

from fastmerge.methods import rng

# Random123 kat_vectors, "philox4x32 10": counter (4 words), key (2 words) -> output (4 words)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


# semantics v2 DARE words: (seed, tensor name, model index, element j) -> word j & 3 of
# Philox4x32-10(key(seed, name, i), counter (lo32(j >> 2), hi32(j >> 2), 0, 0)), computed once
# with a plain-int Philox outside fastmerge. Every backend's tests assert these
# (tests/test_cpu_backend.py, tests/test_triton_backend.py).
DARE_V2_KAT = [
    (0, "model.layers.0.self_attn.q_proj.weight", 0, 0, 0x5C4D01EF),
    (0, "model.layers.0.self_attn.q_proj.weight", 0, 1, 0x09658366),
    (0, "model.layers.0.self_attn.q_proj.weight", 0, 2, 0x227D01CF),
    (0, "model.layers.0.self_attn.q_proj.weight", 0, 3, 0x331917B2),
    (42, "model.layers.3.mlp.up_proj.weight", 1, 5, 0x90CED407),
    (42, "model.layers.3.mlp.up_proj.weight", 2, 1023, 0xDE276166),
    (7, "lm_head.weight", 0, (1 << 34) + 6, 0xC3846062),
    (2**63 + 5, "embed", 31, (1 << 34) - 1, 0x1C72EA98),
]
KAT_DENSITY = 0.3  # keep iff word < floor(0.3 * 2^32) = 0x4CCCCCCC
DARE_V2_KEEP = [False, True, True, True, False, False, False, True]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    got = tuple(int(w) for w in rng.philox4x32_10(ctr, key))
    assert got == want


def test_dare_v2_known_answers():
    thr = rng.dare_keep_threshold(KAT_DENSITY)
    assert thr == 0x4CCCCCCC
    for (seed, name, i, j, word), keep in zip(DARE_V2_KAT, DARE_V2_KEEP):
        key = rng.dare_key(seed, name, i)
        assert int(rng.philox_uniform_u32(key, j, 1)[0]) == word
        # the same word inside runs that start at every position of its group of four
        for before in range(6):
            assert int(rng.philox_uniform_u32(key, j - min(before, j), 9)[min(before, j)]) == word
        assert bool(rng.dare_mask((1,), KAT_DENSITY, seed, name, i, offset=j)[0]) == keep
        # the formula itself: word j & 3 of counter j >> 2
        c = j >> 2
        out = rng.philox4x32_10((c & rng.MASK32, c >> 32, 0, 0), (key & rng.MASK32, key >> 32))
        assert int(out[j & 3]) == word


def test_four_elements_share_one_counter():
    """semantics v2: elements 4c .. 4c + 3 are the four words of counter c (v1 drew counter j)."""
    key = rng.dare_key(3, "w", 0)
    words = rng.philox_uniform_u32(key, 40, 8)
    for c in (10, 11):
        want = rng.philox4x32_10((c, 0, 0, 0), (key & rng.MASK32, key >> 32))
        assert [int(w) for w in words[4 * (c - 10):4 * (c - 9)]] == [int(w) for w in want]


def test_splitmix_and_fnv_known_values():
    # SplitMix64 from state 0: the first output of the reference generator (Vigna)
    assert rng.splitmix64(0) == 0xE220A8397B1DCDAF
    # FNV-1a 64 of the empty string is the offset basis; of "a" the published value
    assert rng.fnv1a64("") == 0xCBF29CE484222325
    assert rng.fnv1a64("a") == 0xAF63DC4C8601EC8C


def test_dare_mask_reproducible_and_distinct():
    a = rng.dare_mask((64, 33), 0.3, seed=5, tensor_name="w", model_index=0)
    assert torch.equal(a, rng.dare_mask((64, 33), 0.3, seed=5, tensor_name="w", model_index=0))
    assert not torch.equal(a, rng.dare_mask((64, 33), 0.3, seed=6, tensor_name="w", model_index=0))
    assert not torch.equal(a, rng.dare_mask((64, 33), 0.3, seed=5, tensor_name="v", model_index=0))
    assert not torch.equal(a, rng.dare_mask((64, 33), 0.3, seed=5, tensor_name="w", model_index=1))


def test_dare_mask_independent_of_chunking():
    whole = rng.dare_mask((1000,), 0.4, 9, "x", 2)
    parts = torch.cat([rng.dare_mask((n,), 0.4, 9, "x", 2, offset=o)
                       for o, n in ((0, 17), (17, 2), (19, 1), (20, 397), (417, 583))])
    assert torch.equal(whole, parts)


def test_dare_keep_fraction():
    n = 200_000
    for d in (0.1, 0.5, 0.9):
        kept = rng.dare_mask((n,), d, 1, "t", 0).sum().item()
        sigma = (n * d * (1 - d)) ** 0.5
        assert abs(kept - n * d) < 5 * sigma


def test_keep_threshold_extremes():
    assert rng.dare_keep_threshold(1.0) == 1 << 32
    assert rng.dare_keep_threshold(0.0) == 0
    assert rng.dare_keep_threshold(0.5) == 1 << 31
    assert rng.dare_mask((10,), 1.0, 0, "a", 0).all()
    assert not rng.dare_mask((10,), 0.0, 0, "a", 0).any()


def test_counter_high_word_used():
    # elements past 2^32 use the high counter word: j and j + 2^32 must differ
    lo = rng.philox_uniform_u32(123, 5, 4)
    hi = rng.philox_uniform_u32(123, 5 + (1 << 32), 4)
    assert not torch.equal(lo, hi)
