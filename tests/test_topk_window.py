"""The one-pass exact top-k (``fastmerge::topk_window``, csrc/cpu/select.cpp) against its
plain-torch definition: thresholds bit-identical and L1 sums within 1e-12 over dtypes x shapes
(exhaustive and sampled windows), both scan paths (scalar, AVX-512), threshold ties, all-equal
and all-zero task vectors, 1 and 2 threads; the miss path (a window that does not hold the k-th)
and the planner's fall back to the radix selection; NaN/Inf errors; opcheck."""
import pytest
import torch
from helpers import make_finetunes

from fastmerge.backends import availability, get_backend, ops
from fastmerge.methods import resolve_spec
from fastmerge.planning.plan import plan_tensor
from fastmerge.planning.selection import Chunk

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")
if ok:
    import fastmerge._C as C

NAME = "model.layers.0.self_attn.q_proj.weight"


def _requests(n_models, numel):
    ks = sorted({min(2, numel), 1, max(1, numel // 100), max(1, numel // 5),
                 max(1, numel // 2), max(1, numel - 1), numel})
    return torch.tensor([[i, k] for i in range(n_models) for k in ks], dtype=torch.int64)


def _check(base, models, req, isa=2, margin=5.0):
    got = C.topk_window(base, models, req, True, margin, isa)
    want = ops.topk_window_torch(base, models, req, True)
    assert torch.equal(got[3], want[3])
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=0)
    hit = got[0] >= 0
    assert torch.equal(got[0][hit], want[0][hit])
    torch.testing.assert_close(got[1][hit], want[1][hit], rtol=1e-12, atol=0)
    return hit


@pytest.mark.parametrize("isa", [0, 2])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (300, 301), (70001,), (1031, 2049)])
def test_matches_torch(shape, dtype, isa):
    """Up to 65536 elements the sample is the whole tensor (exact window); above, it samples."""
    base, models, _ = make_finetunes(shape, 2, (dtype, dtype), seed=3)
    hit = _check(base, models, _requests(2, base.numel()), isa)
    assert bool(hit.all())  # the default margin did not miss on these task vectors


@pytest.mark.parametrize("isa", [0, 2])
def test_ties_all_equal_and_zero(isa):
    n = 300007
    base = torch.randn(n).to(torch.bfloat16)
    steps = torch.randint(-3, 4, (n,)).to(torch.float32) * 2.0 ** -7  # 7 values: big ties
    tied = (base.float() + steps).to(torch.bfloat16)
    equal = base.float().add(0.5).to(torch.bfloat16)    # |t| takes few values
    zero = base.clone()                                # t = 0 everywhere
    models = [tied, equal, zero]
    req = _requests(3, n)
    hit = _check(base, models, req, isa)
    assert bool(hit.all())


@pytest.mark.parametrize("frac", [0.01, 0.2, 0.5])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("shape", [(70001,), (1031, 2049), (300007,)])
def test_one_request_per_model(shape, with_base, frac):
    """One k per bf16 model (TIES): the fused AVX-512 score + scan (select.cpp, fused_bf16_n)
    over the whole blocks, the two-step scan over the tail; ties from few distinct steps."""
    base, models, _ = make_finetunes(shape, 2, ("bf16", "bf16"), seed=11)
    n = base.numel()
    steps = torch.randint(-3, 4, (n,)).to(torch.float32) * 2.0 ** -7
    models.append((base.float().reshape(-1) + steps).reshape(shape).to(torch.bfloat16))
    k = max(1, int(frac * n))
    req = torch.tensor([[i, k] for i in range(3)], dtype=torch.int64)
    for isa in (0, 2):
        assert bool(_check(base if with_base else None, models, req, isa).all())


def test_nonfinite_counts_in_whole_and_tail_blocks():
    base, models, _ = make_finetunes((70001,), 2, ("bf16", "bf16"), seed=12)
    models[0][1234] = float("nan")
    models[0][70000] = float("inf")   # in the tail (70001 = 136 * 512 + 369)
    models[1][5] = float("-inf")
    req = torch.tensor([[0, 7000], [1, 7000]], dtype=torch.int64)
    for isa in (0, 2):
        got = C.topk_window(base, models, req, False, 5.0, isa)
        assert got[3].tolist() == [2, 1]


def test_no_base_and_mixed_dtypes():
    base, models, _ = make_finetunes((90001,), 3, ("bf16", "fp16", "fp32"), seed=4)
    req = _requests(3, base.numel())
    assert bool(_check(None, models, req).all())
    assert bool(_check(base, models, req).all())


def test_misses_are_reported_never_wrong():
    """Margin 0: the window is one sampled value, so most requests miss (-1); any hit is exact."""
    base, models, _ = make_finetunes((1031, 2049), 2, ("fp32", "fp32"), seed=5)
    hit = _check(base, models, _requests(2, base.numel()), margin=0.0)
    assert not bool(hit.all())


def test_threads_do_not_change_results():
    base, models, _ = make_finetunes((700001,), 2, ("bf16", "fp32"), seed=6)
    req = _requests(2, base.numel())
    old = torch.get_num_threads()
    try:
        res = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            res.append(torch.ops.fastmerge.topk_window(base, models, req, True))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method,params", [("ties", dict(density=0.2, rescale="l1")),
                                           ("breadcrumbs_ties", dict(density=0.3, gamma=0.05))])
def test_planner_uses_one_pass_and_falls_back(method, params, monkeypatch):
    base, models, _ = make_finetunes((513, 257), 3, ("bf16", "bf16", "fp16"), seed=7)
    spec = resolve_spec(method, 3, **params)
    be = get_backend("cpu", "cpu")
    chunk = Chunk(base, models, [], 0, NAME)
    fast = plan_tensor(spec, lambda: [chunk], be, base.numel(), NAME)
    assert fast.passes == 1 + (spec.rescale == "l1" and spec.sparsifier == "dare")
    torch_plan = plan_tensor(spec, lambda: [chunk], get_backend("torch", "cpu"), base.numel(),
                             NAME)
    miss = lambda b, m, r, l1: (torch.full((r.shape[0],), -1, dtype=torch.int64),  # noqa: E731
                                *ops.topk_window_torch(b, m, r, l1)[1:])
    monkeypatch.setattr(be, "topk_window", miss)
    radix = plan_tensor(spec, lambda: [chunk], be, base.numel(), NAME)
    # the radix selection after the miss: one read on backend "cpu" (the tensor's one chunk
    # predicts its own level-1 bins: planning/radix.py radix_select_one_read)
    assert radix.passes == 1
    for other in (torch_plan, radix):
        assert torch.equal(fast.fparams, other.fparams) or torch.allclose(
            fast.fparams, other.fparams, rtol=1e-6, atol=0)
        assert fast.info["thresholds"] == other.info["thresholds"]


def test_nonfinite_is_a_clear_error():
    base, models, _ = make_finetunes((4099,), 2, ("bf16", "bf16"), seed=8)
    models[1][17] = float("nan")
    spec = resolve_spec("ties", 2, density=0.5)
    with pytest.raises(ValueError, match=r"model 1 for tensor '.*q_proj.weight' contains 1 NaN"):
        plan_tensor(spec, lambda: [Chunk(base, models, [], 0, NAME)], get_backend("cpu", "cpu"),
                    base.numel(), NAME)


def test_bad_requests_are_clear_errors():
    base, models, _ = make_finetunes((100,), 1, ("fp32",), seed=9)
    with pytest.raises(RuntimeError, match="need 1 <= k <= 100"):
        torch.ops.fastmerge.topk_window(base, models, torch.tensor([[0, 101]]), False)
    with pytest.raises(RuntimeError, match="names model 1 of 1"):
        torch.ops.fastmerge.topk_window(base, models, torch.tensor([[1, 5]]), False)


def test_opcheck():
    base, models, _ = make_finetunes((257, 3), 2, ("bf16", "fp32"), seed=10)
    torch.library.opcheck(torch.ops.fastmerge.topk_window.default,
                          (base, models, torch.tensor([[0, 5], [1, 700]]), True))
