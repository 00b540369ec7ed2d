"""LiNeS: depth-scaled merging (Wang et al., 2024, https://arxiv.org/abs/2410.17146).

L(tensor) = alpha + beta * depth / (D - 1), depth the 0-based block index parsed from the
tensor name with an anchored pattern (``layers.1.`` never matches ``layers.10.``). A model
with several stacks of blocks (T5's encoder and decoder, CLIP's text and vision towers) scales
each over its own D: a stack is the name up to the index (``decoder.block.``)."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Union

DEFAULT_BLOCK_PATTERN = (r"(^|\.)(model\.layers|layers|transformer\.h|h|encoder\.layer|"
                         r"visual\.transformer\.resblocks|transformer\.resblocks|blocks|"
                         r"decoder\.layers|encoder\.layers|encoder\.block|decoder\.block)"
                         r"\.(\d+)\.")


def block_index(name: str, pattern: Union[str, re.Pattern] = DEFAULT_BLOCK_PATTERN
                ) -> Optional[int]:
    """The block (layer) index in a tensor name, or None outside every block."""
    m = re.search(pattern, name)
    return int(m.groups()[-1]) if m else None


def block_of(name: str, pattern=DEFAULT_BLOCK_PATTERN) -> Optional[tuple[str, int]]:
    """(its stack: the name up to the index, the index), or None outside every block."""
    m = re.search(pattern, name)
    if not m:
        return None
    last = len(m.groups())
    return name[:m.start(last)], int(m.group(last))


def stack_sizes(names: Iterable[str], pattern=DEFAULT_BLOCK_PATTERN) -> dict:
    """stack -> its D, one more than its largest block index."""
    sizes: dict = {}
    for n in names:
        b = block_of(n, pattern)
        if b is not None:
            sizes[b[0]] = max(sizes.get(b[0], 0), b[1] + 1)
    return sizes


def block_depth(names: Iterable[str], outside: str = "alpha", pattern=DEFAULT_BLOCK_PATTERN
                ) -> Callable[[str], Optional[tuple[int, int]]]:
    """name -> (depth, D of its own stack); tensors outside every block: None
    (``outside="alpha"``), or depth 0 before the first block and D - 1 after the last, D the
    largest stack's (``outside="ends"``, by position in ``names``, the checkpoint's order)."""
    names = list(names)
    if outside not in ("alpha", "ends"):
        raise ValueError(f"lines outside must be 'alpha' or 'ends'; got {outside!r}")
    sizes = stack_sizes(names, pattern)
    d_max = max(sizes.values(), default=0)
    first = next((k for k, n in enumerate(names) if block_of(n, pattern) is not None), None)
    position = {n: k for k, n in enumerate(names)}

    def depth(name: str) -> Optional[tuple[int, int]]:
        b = block_of(name, pattern)
        if b is not None:
            return b[1], sizes.get(b[0], b[1] + 1)
        if outside == "alpha" or first is None:
            return None
        return (0, d_max) if position.get(name, 0) < first else (d_max - 1, d_max)
    return depth


def block_position(names: Iterable[str], outside: str = "alpha", pattern=DEFAULT_BLOCK_PATTERN
                   ) -> Callable[[str], Optional[float]]:
    """name -> depth / (D - 1) in its stack, in [0, 1] (0 where D = 1); None as block_depth."""
    depth = block_depth(names, outside, pattern)

    def pos(name: str) -> Optional[float]:
        d = depth(name)
        return None if d is None else d[0] / (d[1] - 1) if d[1] > 1 else 0.0
    return pos


def count_blocks(names: Iterable[str], pattern=DEFAULT_BLOCK_PATTERN) -> int:
    """D: one more than the largest block index present (0 if none)."""
    idx = [i for i in (block_index(n, pattern) for n in names) if i is not None]
    return max(idx) + 1 if idx else 0


def lines_factor(depth: Optional[int], num_blocks: int, alpha: float, beta: float) -> float:
    """alpha + beta * depth / (D - 1); alpha for D <= 1 or a tensor outside every block."""
    if depth is None or num_blocks <= 1:
        return float(alpha)
    return float(alpha) + float(beta) * depth / (num_blocks - 1)
