"""An output chunk that a fastmerge._core kernel wrote, with the NaN/Inf count its store took
on the bits written: the writer thread's check (CoreKernels.nonfinite_of) reads the count
instead of passing over the output bytes a second time."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StoreChecked:
    """``data``: the output bytes; ``nonfinite``: (count, first index) of their NaN/Inf
    values, or None when all are finite (report.nonfinite_in's answer)."""
    data: memoryview
    nonfinite: Optional[tuple]

    @classmethod
    def of(cls, data, stored) -> StoreChecked:
        """``stored``: a kernel's (count, first index or -1)."""
        count, first = stored
        return cls(data, None if count == 0 else (int(count), int(first)))
