"""LiNeS: depth-scaled merging (Wang et al., 2024, https://arxiv.org/abs/2410.17146).

L(tensor) = alpha + beta * depth / (D - 1), depth the 0-based block index parsed from the
tensor name with an anchored pattern (``layers.1.`` never matches ``layers.10.``)."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Union

DEFAULT_BLOCK_PATTERN = (r"(^|\.)(model\.layers|layers|transformer\.h|encoder\.layer|"
                         r"visual\.transformer\.resblocks|transformer\.resblocks|blocks|"
                         r"decoder\.layers|encoder\.layers)\.(\d+)\.")


def block_index(name: str, pattern: Union[str, re.Pattern] = DEFAULT_BLOCK_PATTERN) -> Optional[int]:
    """The block (layer) index in a tensor name, or None outside every block."""
    m = re.search(pattern, name)
    return int(m.groups()[-1]) if m else None


def count_blocks(names: Iterable[str], pattern=DEFAULT_BLOCK_PATTERN) -> int:
    """D: one more than the largest block index present (0 if none)."""
    idx = [i for i in (block_index(n, pattern) for n in names) if i is not None]
    return max(idx) + 1 if idx else 0


def lines_factor(depth: Optional[int], num_blocks: int, alpha: float, beta: float) -> float:
    """alpha + beta * depth / (D - 1); alpha for D <= 1 or a tensor outside every block."""
    if depth is None or num_blocks <= 1:
        return float(alpha)
    return float(alpha) + float(beta) * depth / (num_blocks - 1)


def depth_function(names: Iterable[str], outside: str = "alpha", pattern=DEFAULT_BLOCK_PATTERN
                   ) -> Callable[[str], Optional[int]]:
    """name -> depth. ``outside="alpha"``: tensors outside blocks get None (factor alpha);
    ``outside="ends"``: tensors before the first block get 0, after the last get D - 1
    (by their position in ``names``, the checkpoint's order)."""
    names = list(names)
    if outside not in ("alpha", "ends"):
        raise ValueError(f"lines outside must be 'alpha' or 'ends'; got {outside!r}")
    d = count_blocks(names, pattern)
    first_block = next((k for k, n in enumerate(names) if block_index(n, pattern) is not None), None)
    position = {n: k for k, n in enumerate(names)}

    def depth(name: str) -> Optional[int]:
        b = block_index(name, pattern)
        if b is not None or outside == "alpha" or first_block is None:
            return b
        return 0 if position.get(name, 0) < first_block else d - 1
    return depth
