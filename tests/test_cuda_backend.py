"""CUDA-specific tests of the fastmerge._cuda kernels (run only where a GPU and the built
extension are present; skipped with the reason otherwise).

The generic conformance suite (test_ops.py) already runs every method on the "cuda"
backend when ``availability("cuda")`` is true; this file adds what is specific to the CUDA
kernels: torch.library.opcheck of the three ops, bit-exact agreement of the three primitives
with the plain-torch kernels of ops.py on CUDA tensors (vector and scalar load paths, any
dtype mix, 1..12 models), chunked == whole (DARE counters), NaN/Inf counting, and a smoke
test of a tensor with more than 2^31 elements when the GPU has the memory.
"""
from __future__ import annotations

import os

import pytest
import torch
from helpers import DTYPES, make_finetunes

import fastmerge as fm
from fastmerge import abi
from fastmerge.backends import availability, get_backend, ops
from fastmerge.methods import resolve_spec
from fastmerge.planning.plan import plan_tensor
from fastmerge.planning.selection import Chunk

_OK, _WHY = availability("cuda")
pytestmark = pytest.mark.skipif(not _OK, reason=f"CUDA backend unavailable here: {_WHY}")

NAME = "model.layers.3.mlp.up_proj.weight"
DEV = "cuda"


def _cuda():
    return get_backend("cuda", DEV)


def _inputs(shape, n, dtypes=("bf16",), seed=0, moments=False):
    base, models, vs = make_finetunes(shape, n, dtypes, seed=seed, second_moments=moments)
    base, models = base.to(DEV), [m.to(DEV) for m in models]
    vs = [v.to(DEV) for v in vs] if vs is not None else []
    return base, models, vs


def _plan(method, base, models, vs, **params):
    """A plan computed by the torch backend (so the CUDA ops are checked against it alone)."""
    spec = resolve_spec(method, len(models), **params)
    chunk = Chunk(base, models, vs if spec.needs_second_moments else [], 0, NAME)
    be = get_backend("torch", DEV)
    return spec, chunk, plan_tensor(spec, lambda: [chunk], be, models[0].numel(), NAME)


# ----------------------------------------------------------------------------- opcheck
def test_opcheck_three_ops():
    base, models, vs = _inputs((37, 21), 3, ("bf16", "fp16", "fp32"), moments=True)
    spec, chunk, plan = _plan("ties", base, models, vs, density=0.4)
    targets = torch.tensor([[0, 0], [2, 0]], dtype=torch.int64, device=DEV)
    counts = torch.zeros(2, abi.NUM_BINS, dtype=torch.int64, device=DEV)
    sums = torch.zeros(2, abi.NUM_BINS, dtype=torch.float64, device=DEV)
    torch.library.opcheck(torch.ops.fastmerge.score_histogram.default,
                          (base, models, vs, 0, targets, 0, counts, sums))
    p = plan.on(DEV)
    out = torch.zeros(3, 3, dtype=torch.float64, device=DEV)
    torch.library.opcheck(torch.ops.fastmerge.model_stats.default,
                          (base, models, vs, 1, p.fparams, p.iparams, 0.5, 0, out))
    nonfinite = torch.zeros(3, dtype=torch.int64, device=DEV)
    torch.library.opcheck(torch.ops.fastmerge.fused_merge.default,
                          (base, models, [], p.fparams, p.iparams, *p.op_args(), 0,
                           torch.bfloat16, nonfinite))


# ----------------------------------------------------------------------------- primitives
def _hist(fn, base, models, vs, score, targets, level):
    counts = torch.zeros(targets.shape[0], abi.NUM_BINS, dtype=torch.int64, device=DEV)
    sums = torch.zeros(targets.shape[0], abi.NUM_BINS, dtype=torch.float64, device=DEV)
    fn(base, models, vs, score, targets, level, counts, sums)
    return counts.cpu(), sums.cpu()


@pytest.mark.parametrize("numel", [1, 7, 2048, 2049, 100_003])
@pytest.mark.parametrize("dtypes", [("bf16",), ("fp16", "fp32"), ("fp32",)], ids=str)
@pytest.mark.parametrize("score", [0, 1])
def test_histogram_matches_torch(numel, dtypes, score):
    base, models, vs = _inputs((numel,), 2, dtypes, seed=numel, moments=True)
    cuda = _cuda()
    t0 = torch.tensor([[0, 0], [1, 0]], device=DEV)
    c_ref, s_ref = _hist(ops.score_histogram_torch, base, models, vs, score, t0, 0)
    c, s = _hist(cuda.score_histogram, base, models, vs, score, t0, 0)
    assert torch.equal(c, c_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=0)
    # level 1 inside the fullest level-0 bin of each model
    prefixes = c_ref.argmax(1)
    t1 = torch.stack([torch.arange(2), prefixes], 1).to(DEV)
    c_ref, s_ref = _hist(ops.score_histogram_torch, base, models, vs, score, t1, 1)
    c, s = _hist(cuda.score_histogram, base, models, vs, score, t1, 1)
    assert torch.equal(c, c_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=0)


def test_histogram_unaligned_and_no_base():
    base, models, _ = _inputs((4099,), 2, ("bf16",), seed=3)
    # views starting one element in: scalar-load path
    b1, m1 = base[1:], [m[1:] for m in models]
    t0 = torch.tensor([[0, 0], [1, 0]], device=DEV)
    for b in (b1, None):
        c_ref, s_ref = _hist(ops.score_histogram_torch, b, m1, [], 0, t0, 0)
        c, s = _hist(_cuda().score_histogram, b, m1, [], 0, t0, 0)
        assert torch.equal(c, c_ref)
        torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method,params", [
    ("dare_linear", dict(density=0.3, seed=5, rescale="l1")),
    ("breadcrumbs", dict(density=0.4, gamma=0.05, rescale="l1")),
    ("ota", dict(ota_normalize="global")),
])
def test_model_stats_matches_torch(method, params):
    base, models, vs = _inputs((5001,), 3, ("bf16", "fp32"), seed=1, moments=True)
    spec, chunk, plan = _plan(method, base, models, vs, **params)
    p = plan.on(DEV)
    outs = []
    for fn in (ops.model_stats_torch, _cuda().model_stats):
        out = torch.zeros(3, 3, dtype=torch.float64, device=DEV)
        fn(base, models, vs, p.score, p.fparams, p.iparams, float(spec.power), 0, out)
        outs.append(out.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=0)


MERGES = [
    ("linear", dict()),
    ("task_arithmetic", dict(lambda_=0.8)),
    ("ties", dict(density=0.3)),
    ("dare_ties", dict(density=0.5, seed=9)),
    ("breadcrumbs_ties", dict(density=0.4, gamma=0.02)),
    ("consensus_ties", dict(density=0.5)),
    ("ota_ffg", dict(density=0.3)),
]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 12])
@pytest.mark.parametrize("method,params", MERGES, ids=[m for m, _ in MERGES])
def test_fused_merge_matches_torch(method, params, n):
    base, models, vs = _inputs((3, 1000), n, ("bf16",), seed=n, moments=True)
    spec, chunk, plan = _plan(method, base, models, vs, **params)
    want, nf_want = get_backend("torch", DEV).merge(chunk, plan, torch.bfloat16)
    got, nf = _cuda().merge(chunk, plan, torch.bfloat16)
    assert torch.equal(nf, nf_want)
    # same float32 operations in the same order (shared per-element code): equal outputs,
    # except float32 summation order, which is also fixed -> compare exactly, fall back to ulp
    diff = (got.float() - want.float()).abs()
    assert diff.max().item() <= 2 * torch.finfo(torch.bfloat16).eps * want.float().abs().max()
    assert (got != want).float().mean().item() < 1e-3


@pytest.mark.parametrize("dtypes", [("bf16",), ("fp16",), ("fp32",), ("fp32", "bf16"),
                                    ("fp16", "bf16", "fp32")], ids=str)
@pytest.mark.parametrize("out_dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("offset_view", [0, 1])
def test_dtypes_and_alignment(dtypes, out_dtype, offset_view):
    base, models, _ = _inputs((8 * 1024 + 5,), 3, dtypes, seed=11)
    if offset_view:  # misaligned views: the element-wise load path
        base, models = base[1:], [m[1:] for m in models]
    params = dict(density=0.35, weights=[0.6, 0.4, 1.0])
    out = fm.merge_tensors(base, models, "ties", backend="cuda", tensor_name=NAME,
                           out_dtype=DTYPES[out_dtype], **params)
    want = fm.merge_tensors(base, models, "ties", backend="torch", tensor_name=NAME,
                            out_dtype=DTYPES[out_dtype], **params)
    assert out.dtype == DTYPES[out_dtype]
    assert (out != want).float().mean().item() < 1e-3
    torch.testing.assert_close(out.float(), want.float(), rtol=1e-2, atol=1e-3)


def test_chunked_equals_whole():
    """Chunks at arbitrary (unaligned) offsets give the whole tensor's output bit for bit."""
    base, models, vs = _inputs((100_001,), 3, ("bf16",), seed=2)
    for method, params in (("dare_ties", dict(density=0.4, seed=1)),
                           ("ties", dict(density=0.2))):
        spec, chunk, plan = _plan(method, base, models, [], **params)
        whole, _ = _cuda().merge(chunk, plan, torch.bfloat16)
        parts, start = [], 0
        for size in (1, 4095, 8192, 33, 100_001):
            stop = min(start + size, base.numel())
            if stop <= start:
                break
            c = Chunk(base[start:stop], [m[start:stop] for m in models], [], start, NAME)
            parts.append(_cuda().merge(c, plan, torch.bfloat16)[0])
            start = stop
        assert start == base.numel()
        assert torch.equal(torch.cat(parts), whole), method


def test_dare_mask_bit_identical():
    t = torch.ones(70_001, dtype=torch.float32, device=DEV)
    for offset in (0, 5, (1 << 32) - 3):
        out = torch.zeros_like(t)
        spec, chunk, plan = _plan("dare_linear", torch.zeros_like(t), [t], [], density=0.37,
                                  seed=123, rescale=None)
        c = Chunk(torch.zeros_like(t), [t], [], offset, NAME)
        out, _ = _cuda().merge(c, plan, torch.float32)
        want = fm.dare_mask(t.shape, 0.37, seed=123, tensor_name=NAME, offset=offset,
                            device=DEV)
        assert torch.equal(out != 0, want), offset


def test_nonfinite_counted():
    base, models, _ = _inputs((9000,), 2, ("bf16",), seed=4)
    models[1][17] = float("nan")
    models[1][8000] = float("inf")
    models[0][3] = float("-inf")
    with pytest.raises(ValueError, match="model 0"):
        fm.merge_tensors(base, models, "task_arithmetic", backend="cuda", tensor_name=NAME)
    spec, chunk, plan = _plan("task_arithmetic", base, models, [])
    _, nf = _cuda().merge(chunk, plan, torch.bfloat16)
    assert nf.tolist() == [1, 2]


@pytest.mark.skipif(os.environ.get("FASTMERGE_LARGE_TESTS") != "1",
                    reason="opt-in (FASTMERGE_LARGE_TESTS=1): ~13 GiB of GPU memory")
def test_more_than_2_pow_31_elements():
    """A tensor of 2^31 + 4099 bf16 elements: 64-bit indexing in all three kernels."""
    n = (1 << 31) + 4099
    need = 3 * 2 * n + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} free")
    base = torch.zeros(n, dtype=torch.bfloat16, device=DEV)
    model = torch.ones(n, dtype=torch.bfloat16, device=DEV)
    model[-7:] = 3.0
    model[-1] = -2.0
    cuda = _cuda()
    targets = torch.tensor([[0, 0]], device=DEV)
    counts = torch.zeros(1, abi.NUM_BINS, dtype=torch.int64, device=DEV)
    sums = torch.zeros(1, abi.NUM_BINS, dtype=torch.float64, device=DEV)
    cuda.score_histogram(base, [model], [], 0, targets, 0, counts, sums)
    assert int(counts.sum()) == n
    assert int(counts[0, 0x3F80]) == n - 7  # |t| = 1.0
    assert int(counts[0, 0x4040]) == 6      # |t| = 3.0
    assert int(counts[0, 0x4000]) == 1      # |t| = 2.0
    assert sums[0].sum().item() == float(n - 7 + 18 + 2)
    # keep |t| >= 3: exactly the six 3.0 near the end, which lie beyond index 2^31
    out = fm.merge_tensors(base, [model], "magnitude_prune", thresholds=[(3.0, float("inf"))],
                           backend="cuda", tensor_name=NAME)
    assert out.shape == (n,) and out.dtype == torch.bfloat16
    assert out[-8:].float().cpu().tolist() == [0.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.0]
    assert int(torch.count_nonzero(out)) == 6
