"""The domain of second moments (fisher and ota read them): finite and non-negative."""
from __future__ import annotations

import torch


def finite_non_negative(v: torch.Tensor) -> bool:
    """Whether a second-moment tensor is all finite and >= 0, in one reduction (aminmax; NaN
    propagates into it): the separate isfinite / < 0 checks allocated two bool tensors and took
    ~0.1 s per 45M-element tensor here."""
    if v.numel() == 0:
        return True
    lo, hi = torch.aminmax(v.to(torch.float32) if v.dtype != torch.float32 else v)
    return bool(lo >= 0) and bool(hi < float("inf"))
