import os

import pytest
import torch

import fastmerge
from fastmerge.backends import availability

# Every concrete backend; each test that takes ``backend`` runs once per backend and is
# skipped, with the reason, where that backend cannot run on this machine.
ALL_BACKENDS = ("torch", "cpu", "cuda", "triton")


def backend_device(name: str) -> str:
    if name == "cuda":
        return "cuda"
    if name == "triton":
        from fastmerge import triton_kernels
        return triton_kernels.default_device()
    return "cpu"


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    ok, why = availability(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable here: {why}")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
