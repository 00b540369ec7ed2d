import os

import pytest
import torch

# The Triton kernels run on CPU tensors in the Triton interpreter where no GPU is present. The
# variable must be set before triton is first imported (triton reads it when a kernel is
# defined), so it is set here, before fastmerge loads its Triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmerge.backends import REGISTRY, availability

# Every registered backend; each test that takes ``backend`` runs once per backend and is
# skipped, with the reason, where that backend cannot run on this machine.
ALL_BACKENDS = tuple(REGISTRY)


def backend_device(name: str) -> str:
    if name == "cuda":
        return "cuda"
    if name == "triton":
        from fastmerge.backends import triton as triton_kernels
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
