"""How one Triton launch is split so that most of it keeps vector loads (issue #21, item 6).

Triton vectorises a masked load only where it can prove the mask constant over a vector and
the address aligned: it specialises a pointer argument whose address divides by 16 and an
integer argument that divides by 16 (``tt.divisibility``), so ``offs < n`` with such an ``n``
is constant over 16 elements. A call whose views start at an odd element offset, or whose size
does not divide by 16, therefore runs as up to three launches over consecutive pieces:
- a head of h < 8 elements, after which every pointer is 16-byte aligned (only when one h
  aligns them all: views at the same element offset);
- the body: a multiple of 16 elements from aligned pointers (vector loads);
- the tail: the < 16 elements left (its pointers are aligned, its size is not).
Each piece shifts its element indices (DARE's Philox counter) by its start. Pure Python, no
triton import, so it is tested on any machine.
"""
from __future__ import annotations

from typing import Iterable, Optional

ALIGN = 16      # bytes Triton's pointer specialisation asks of an address
MULTIPLE = 16   # what Triton's integer specialisation asks of a size
MAX_HEAD = 8    # 16 bytes of the narrowest (16-bit) element type


def head(spans: Iterable[tuple[int, int]]) -> Optional[int]:
    """The smallest h in [0, 8) with every (address, element bytes) span 16-byte aligned h
    elements in; None when no h aligns them all."""
    spans = list(spans)
    for h in range(MAX_HEAD):
        if all((addr + h * size) % ALIGN == 0 for addr, size in spans):
            return h
    return None


def pieces(numel: int, spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, count) of the launches of one call over ``numel`` elements (see module doc);
    one piece when the pointers are aligned and numel divides by 16, or when no head exists."""
    h = head(spans)
    if h is None:
        return [(0, numel)]
    h = min(h, numel)
    body = (numel - h) // MULTIPLE * MULTIPLE
    tail = numel - h - body
    out = [(0, h)] if h else []
    if body:
        out.append((h, body))
    if tail:
        out.append((h + body, tail))
    return out


def out_shift(spans: Iterable[tuple[int, int]], out_bytes: int) -> int:
    """Where a fresh output (16-byte aligned storage) should start, in elements, so that the
    inputs' head aligns it too: 0 when they need no head or no head aligns them."""
    h = head(spans)
    if not h:
        return 0
    return next(k for k in range(MAX_HEAD) if (k + h) * out_bytes % ALIGN == 0)


def tensor_spans(tensors) -> list[tuple[int, int]]:
    """(data_ptr, element bytes) of each distinct tensor (None skipped)."""
    seen, out = set(), []
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        out.append((t.data_ptr(), t.element_size()))
    return out
