"""Top-k and band thresholds without torch: what each model's sparsifier asks the selection
for, what needs no selection, the one-pass selection's bookkeeping around a ``topk_window``
kernel (selection.py hands it the torch op, pipeline/core_kernels.py fastmerge._core's), and the
per-model (lo, hi) thresholds from the selected values."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..methods import MergeSpec, band_counts, top_k_count

INF = float("inf")


@dataclass
class Selection:
    """k-th largest score for each request (model, k), and what the threshold keeps."""
    thresholds: list[float]
    kept_l1: Optional[list[float]]
    passes: Optional[int] = None  # read passes the selection made, where the kernels count them


def selection_requests(spec: MergeSpec, numel: int) -> list[list[int]]:
    """The k's each model's sparsifier needs: [k] for top-k, [k_lo, n_top] for a band."""
    out = []
    for d, g in zip(spec.densities, spec.gammas):
        if spec.sparsifier in ("topk", "fisher"):
            out.append([top_k_count(d, numel)])
        elif spec.sparsifier == "band":
            n_top, k_lo = band_counts(d, g, numel)
            out.append([0] if top_k_count(d, numel) == 0 else [k_lo, n_top])
        else:
            out.append([])
    return out


def bits_to_floats(bits) -> list[float]:
    """float32 values of 32-bit patterns."""
    bits = [int(b) & 0xFFFFFFFF for b in bits]
    return list(struct.unpack(f"<{len(bits)}f", struct.pack(f"<{len(bits)}I", *bits)))


def nonfinite_error(i: int, count: int, names: Sequence[str]) -> ValueError:
    what = f"tensor {names[0]!r}" if len(names) == 1 else "the tensors merged"
    return ValueError(f"task vector of model {i} for {what} contains {count} "
                      f"NaN/Inf value(s); fastmerge refuses to merge them")


def unselected(requests: Sequence[tuple[int, int]], n: int,
               total_of: Optional[Callable[[int], float]] = None):
    """What needs no selection, for both selections: the thresholds (k <= 0: inf, k >= n: 0.0,
    the others 0.0 until selected), the indices still to select (0 < k < n), and, given
    ``total_of(i)`` (model i's L1), the kept L1 (the total where k >= n, else 0.0 until
    selected; None without ``total_of``)."""
    thresholds = [INF if k <= 0 else 0.0 for _, k in requests]
    pending = [r for r, (_, k) in enumerate(requests) if 0 < k < n]
    kept = None if total_of is None else \
        [total_of(i) if 0 < k and k >= n else 0.0 for i, k in requests]
    return thresholds, pending, kept


def one_pass(requests: Sequence[tuple[int, int]], n: int, n_models: int, l1: bool,
             names: Sequence[str], kernel: Callable):
    """``select``'s result for (model, k) requests over n elements in one read pass, with the
    per-model total L1 (None unless ``l1``); None where a window missed (the caller then runs
    the radix selection). ``kernel(rows, l1)`` runs topk_window on [model, k] rows and returns
    (threshold bits, kept L1, total L1, NaN/Inf counts) as lists. Raises on NaN/Inf."""
    thresholds, pending, _ = unselected(requests, n)
    rows = [list(requests[r]) for r in pending]
    # with l1, every model's total L1 (kept_l1 = total where k >= n), also when none of its
    # k's needs selecting; NaN/Inf in a model without a request is left to the merge pass
    probe = [[i, 1] for i in range(n_models) if l1 and all(r[0] != i for r in rows)]
    if not rows and not probe:
        return Selection(thresholds, None), None
    thr, kept, total, bad = kernel(rows + probe, l1)
    for i, b in enumerate(bad):
        if b:
            raise nonfinite_error(i, b, names)
    bits = list(thr)[:len(rows)]
    if any(b < 0 for b in bits):
        return None
    for r, value in zip(pending, bits_to_floats(bits)):
        thresholds[r] = value
    if not l1:
        return Selection(thresholds, None), None
    total_l1 = list(total)
    _, _, kept_l1 = unselected(requests, n, lambda i: total_l1[i])
    for r, value in zip(pending, kept):
        kept_l1[r] = value
    return Selection(thresholds, kept_l1), total_l1


def per_model(reqs: list[list[int]], sel: Selection, l1: bool):
    """Per-model (lo, hi) and the L1 each keeps (None unless ``l1``) from the selected values
    of ``selection_requests``: a top-k keeps t >= T(k), a band T(k_lo) <= t < T(n_top)."""
    out, kept, pos = [], [], 0
    for ks in reqs:
        vals = sel.thresholds[pos:pos + len(ks)]
        kl1 = sel.kept_l1[pos:pos + len(ks)] if l1 else [0.0, 0.0]
        pos += len(ks)
        if len(ks) == 1:
            out.append((vals[0], INF))
            kept.append(kl1[0])
        else:  # band: keep lo <= s < hi; hi from k = n_top (inf when n_top = 0)
            lo, hi = vals
            out.append((lo, hi))
            kept.append(kl1[0] - (kl1[1] if hi != INF else 0.0))
    return out, (kept if l1 else None)
