"""The public API: validation messages, dispatch, torch.library registration."""
import pytest
import torch
from helpers import make_finetunes

import fastmerge as fm
from fastmerge import abi
from fastmerge.backends import REGISTRY, get_backend
from fastmerge.methods import resolve_spec
from fastmerge.planning.plan import plan_tensor
from fastmerge.planning.selection import Chunk


@pytest.fixture
def inputs():
    return make_finetunes((20, 5), 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="tiess"), "unknown merge method 'tiess'; supported methods: .*ties"),
    (dict(density=1.5), r"density must be <= 1"),
    (dict(density=float("nan")), "density must be finite"),
    (dict(density=[0.1, 0.2, 0.3]), "density has 3 entries but there are 2 models"),
    (dict(gamma=-0.1), "gamma must be >= 0"),
    (dict(weights="a"), "weights must be a number"),
    (dict(lambda_=float("inf")), "lambda_ must be finite"),
    (dict(rescale="l2"), "rescale must be None, 'l1' or 'inverse_density'"),
    (dict(election="max"), "election must be 'sum' or 'count'"),
    (dict(normalize="yes"), "normalize must be True, False or 'count'"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(backend="metal"),
     "unknown backend 'metal'; choose one of auto, torch, cpu, cuda, triton"),
    (dict(out_dtype=torch.float64), "out_dtype must be one of"),
])
def test_parameter_errors(inputs, kwargs, match):
    base, models, _ = inputs
    method = kwargs.pop("method", "ties")
    with pytest.raises(ValueError, match=match):
        fm.merge_tensors(base, models, method, **kwargs)


def test_tensor_errors_name_the_input(inputs):
    base, models, _ = inputs
    with pytest.raises(ValueError, match=r"tensor 'w': models\[1\] has shape \(5, 20\) but base"):
        fm.merge_tensors(base, [models[0], models[1].reshape(5, 20)], "ties", tensor_name="w")
    with pytest.raises(ValueError, match=r"models\[0\] has dtype torch.int64"):
        fm.merge_tensors(base, [models[0].long(), models[1]], "ties")
    with pytest.raises(ValueError, match="at least one model"):
        fm.merge_tensors(base, [], "ties")
    with pytest.raises(ValueError, match="models must be a list"):
        fm.merge_tensors(base, models[0], "ties")
    with pytest.raises(ValueError, match="second-moment"):
        fm.merge_tensors(base, models, "ota")
    with pytest.raises(ValueError, match="linear averages the models"):
        fm.merge_tensors(base, models, "linear", lambda_=0.5)


def test_unavailable_backend_says_why(inputs):
    base, models, _ = inputs
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' is not available: no CUDA device"):
            fm.merge_tensors(base, models, "ties", backend="cuda")
    avail = fm.available_backends()
    assert avail["torch"] == "ok" and set(avail) == set(REGISTRY) >= {"torch", "cpu"}


def test_auto_picks_an_available_backend(inputs, monkeypatch):
    base, models, _ = inputs
    be = get_backend("auto", "cpu")
    assert be.name in ("cpu", "torch", "triton")
    monkeypatch.setenv("FASTMERGE_BACKEND", "torch")
    assert get_backend("auto", "cpu").name == "torch"


def test_task_vectors_without_base(inputs):
    base, models, _ = inputs
    tvs = [m.float() - base.float() for m in models]
    a = fm.merge_tensors(None, tvs, "ties", density=0.4, backend="torch")
    b = fm.merge_tensors(base.float(), [m.float() for m in models], "ties", density=0.4,
                         backend="torch") - base.float()
    assert torch.allclose(a, b, atol=1e-6)


def _op_samples():
    base, models, vs = make_finetunes((9, 7), 2, ("bf16", "fp32"), second_moments=True)
    spec = resolve_spec("ties", 2, density=0.3)
    chunk = Chunk(base, models, [], 0, "w")
    plan = plan_tensor(spec, lambda: [chunk], get_backend("torch", "cpu"), base.numel(), "w")
    targets = torch.tensor([[0, 0], [1, 0]])
    counts = torch.zeros(2, abi.NUM_BINS, dtype=torch.int64)
    sums = torch.zeros(2, abi.NUM_BINS, dtype=torch.float64)
    stats = torch.zeros(2, 3, dtype=torch.float64)
    nonfinite = torch.zeros(2, dtype=torch.int64)
    return [
        (torch.ops.fastmerge.score_histogram, (base, models, [], 0, targets, 0, counts, sums)),
        (torch.ops.fastmerge.model_stats, (base, models, vs, 1, plan.fparams, plan.iparams, 0.5,
                                           0, stats)),
        (torch.ops.fastmerge.fused_merge, (base, models, [], plan.fparams, plan.iparams,
                                           *plan.op_args(), 0, torch.bfloat16, nonfinite)),
    ]


@pytest.mark.parametrize("i", range(3))
def test_opcheck(i):
    op, args = _op_samples()[i]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_fused_merge_under_torch_compile():
    op, args = _op_samples()[2]
    eager = op(*args)
    compiled = torch.compile(lambda *a: op(*a) * 1, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args), eager)
