"""Counter-based randomness for DARE masks (docs/semantics.md, "DARE's random mask").

Everything here is plain integer arithmetic on torch.int64 tensors, written to mirror the
C++/CUDA header ``csrc/common/fastmerge_rng.h`` line by line, so the masks are bit-identical
on every backend, chunking and device.

Choices where docs/semantics.md is silent (also in docs/semantics.md):
- ``i`` in the key formula is the 0-based model index (the position in ``models``).
- ``splitmix64`` is the standard SplitMix64 step: add the golden gamma, then the finaliser.
- ``fnv1a64`` hashes the UTF-8 bytes of the tensor name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the key and threshold helpers run without torch (pipeline/native.py)
    import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
GOLDEN_GAMMA = 0x9E3779B97F4A7C15

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85


def splitmix64(x: int) -> int:
    """One SplitMix64 step (Steele, Lea, Flood 2014) on a Python int, result in [0, 2^64)."""
    z = (x + GOLDEN_GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def fnv1a64(name: str) -> int:
    """64-bit FNV-1a of the UTF-8 bytes of ``name``."""
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h ^= byte
        h = (h * 0x100000001B3) & MASK64
    return h


def dare_key(seed: int, tensor_name: str, model_index: int) -> int:
    """The 64-bit Philox key of (tensor, model): splitmix64(seed ^ fnv1a64(name) ^ i*golden)."""
    seed &= MASK64
    mix = (model_index * GOLDEN_GAMMA) & MASK64
    return splitmix64(seed ^ fnv1a64(tensor_name) ^ mix)


def dare_keep_threshold(density: float) -> int:
    """Integer keep threshold floor(d * 2^32), clamped to [0, 2^32]; r < threshold keeps."""
    if density >= 1.0:
        return 1 << 32
    if density <= 0.0:
        return 0
    return int(density * 4294967296.0)  # exact: d is a double, the product is exact, int() floors


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * m, for 0 <= a, m < 2^32.

    Split ``m`` into 16-bit halves so no intermediate exceeds 2^49 (no int64 overflow)."""
    m_lo, m_hi = m & 0xFFFF, m >> 16
    p_lo = a * m_lo                      # < 2^48
    p_hi = a * m_hi                      # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = mid & MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi & MASK32, lo


def philox4x32_10(counter: tuple, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32 with 10 rounds (Salmon et al., SC'11), vectorised over int64 tensors.

    counter: four int64 tensors (or ints) holding uint32 words; key: two uint32 ints.
    Returns the four output words as int64 tensors in [0, 2^32)."""
    import torch
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for rnd in range(10):
        if rnd:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniform_u32(key: int, start: int, count: int, device=None) -> torch.Tensor:
    """The DARE words of element indices start .. start+count-1 under a 64-bit key (semantics v2):
    for element j, word ``j & 3`` of Philox(counter (lo32(j >> 2), hi32(j >> 2), 0, 0)).

    One Philox call per counter serves four consecutive elements; a run that starts or ends
    inside a group of four draws the whole group and keeps its part."""
    import torch
    first, last = start >> 2, (start + count + 3) >> 2
    c = torch.arange(first, last, dtype=torch.int64, device=device)
    out = philox4x32_10((c & MASK32, c >> 32, 0, 0), (key & MASK32, key >> 32))
    words = torch.stack(out, dim=1).reshape(-1)  # element 4c + w is word w of counter c
    skip = start - (first << 2)
    return words[skip:skip + count]


def dare_mask(shape, density: float, seed: int, tensor_name: str, model_index: int,
              offset: int = 0, device=None) -> torch.Tensor:
    """Boolean DARE keep-mask of ``shape`` (elements numbered from ``offset`` in row-major order).

    Keep element j iff word ``j & 3`` of Philox(key(seed, name, i), counter=(lo32(j >> 2),
    hi32(j >> 2), 0, 0)) < floor(d*2^32) (semantics v2). The same mask on every backend and in any
    chunking, also one that starts inside a group of four: pass the chunk's global ``offset``."""
    import torch
    shape = torch.Size(shape)
    numel = shape.numel()
    threshold = dare_keep_threshold(density)
    if threshold >= 1 << 32:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if threshold == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    r = philox_uniform_u32(dare_key(seed, tensor_name, model_index), offset, numel, device)
    return (r < threshold).reshape(shape)
