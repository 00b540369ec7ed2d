"""fastmerge._core.gram (csrc/cpu/gram.cpp), the Gram pre-pass of the linear-combination methods
on the torch-free path: against the float64 torch reference (methods.core.gram_matrix) over
dtypes x sizes x vector counts (the register-blocked m <= 4 and the general path), with and
without the base subtracted, zero vectors, NaN/Inf; the same bits for every thread count;
one clear error for wrong buffers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmerge import abi
from fastmerge.methods.core import gram_matrix
from fastmerge.pipeline import native

core = native._core()
pytestmark = pytest.mark.skipif(core is None, reason="fastmerge._core unavailable")

CODES = {torch.float32: abi.DTYPE_FLOAT32, torch.float16: abi.DTYPE_FLOAT16,
         torch.bfloat16: abi.DTYPE_BFLOAT16}
ITEM = 512 * 128   # csrc/cpu kChunk: the work item of the threaded pass


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def run(vecs, tasks, nthreads=2):
    n = vecs[0].numel()
    g = core.gram([as_bytes(v) for v in vecs], [CODES[v.dtype] for v in vecs], tasks, n,
                  nthreads)
    m = len(vecs) - (1 if tasks else 0)
    return np.array(g).reshape(m, m)


def reference(vecs, tasks):
    """The float64 torch reference, the base (the last vector) subtracted in float32."""
    if tasks:
        return gram_matrix([v.float() for v in vecs[:-1]], vecs[-1].float(), True)
    return gram_matrix([v.float() for v in vecs], None, False)


def inputs(m, numel, dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    return [(base + 0.05 * torch.randn(numel, generator=g)).to(dtypes[i % len(dtypes)])
            for i in range(m)]


def close(got, want):
    scale = max(float(np.abs(want).max()), 1e-300)
    assert np.abs(got - want).max() <= 1e-12 * scale, (got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 7, 17, 513, ITEM + 333])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])   # rows of the matrix
@pytest.mark.parametrize("tasks", [False, True])
def test_matches_float64_reference(dtype, numel, m, tasks):
    vecs = inputs(m + tasks, numel, [dtype])
    got = run(vecs, tasks)
    close(got, reference(vecs, tasks))
    assert (got == got.T).all()


def test_mixed_dtypes():
    vecs = inputs(4, 3 * 1000 + 5, [torch.bfloat16, torch.float32, torch.float16])
    for tasks in (False, True):
        close(run(vecs, tasks), reference(vecs, tasks))


@pytest.mark.parametrize("m", [2, 3, 5])
def test_same_bits_for_every_thread_count(m):
    vecs = inputs(m, 5 * ITEM + 1234, [torch.bfloat16])
    for tasks in (False, True):
        want = run(vecs, tasks, nthreads=1)
        for t in (2, 3, 8):
            assert run(vecs, tasks, nthreads=t).tobytes() == want.tobytes()
        assert run(vecs, tasks, nthreads=2).tobytes() == want.tobytes()   # and on a rerun


def test_zero_vectors():
    z = torch.zeros(1001, dtype=torch.bfloat16)
    assert (run([z, z, z], False) == 0).all()
    x = inputs(1, 1001, [torch.bfloat16])[0]
    got = run([x, z, x], True)   # model 0 equals the base: a zero task vector
    assert (got[0] == 0).all() and (got[:, 0] == 0).all()
    close(got, reference([x, z, x], True))


def test_empty_tensor():
    e = torch.zeros(0, dtype=torch.float32)
    assert (run([e, e], False) == 0).all()
    assert run([e, e], True).shape == (1, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_reaches_the_matrix(bad):
    vecs = inputs(3, 777, [torch.float16])
    vecs[1][300] = bad
    got = run(vecs, False)
    assert not np.isfinite(got[1, 1])
    assert np.isfinite(got[0, 0]) and np.isfinite(got[2, 2])


def test_wrong_inputs_are_one_clear_error():
    a = torch.zeros(10, dtype=torch.float32)
    with pytest.raises(ValueError, match="gram"):
        core.gram([as_bytes(a)], [abi.DTYPE_FLOAT32], True, 10, 1)   # tasks without a base
    with pytest.raises(ValueError, match="one dtype code per vector"):
        core.gram([as_bytes(a), as_bytes(a)], [abi.DTYPE_FLOAT32], False, 10, 1)
    with pytest.raises(ValueError, match="vecs"):
        core.gram([as_bytes(a), as_bytes(a[:5])], [abi.DTYPE_FLOAT32] * 2, False, 10, 1)
    with pytest.raises(ValueError, match="gram"):
        core.gram([as_bytes(a)] * 40, [abi.DTYPE_FLOAT32] * 40, False, 10, 1)
