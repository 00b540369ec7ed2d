"""The contract tests: every registered backend (tests/conftest.py's ``backend`` fixture reads
fastmerge.backends.REGISTRY; skipped with the reason where one cannot run) over the same cases
against the float64 reference (fastmerge/reference.py): every method x n = 1, 3 x shapes
(incl. one element and odd sizes), input and output dtypes, threshold ties, all-zero and
all-equal task vectors, density 0 and 1, NaN/Inf inputs. Values within the tolerance of their
output dtype (TOLERANCE; fastmerge.testing adds the float32 summation term), masks identical."""
import pytest
import torch
from conftest import backend_device
from helpers import DTYPES, make_finetunes

import fastmerge as fm
from fastmerge.testing import assert_matches_reference, reference_masks

METHOD_PARAMS = {
    "linear": dict(weights=[0.5, 1.0, 2.0]),
    "task_arithmetic": dict(weights=[0.7, 1.0, 0.3], lambda_=0.9),
    "magnitude_prune": dict(density=0.3),
    "ties": dict(density=[0.2, 0.5, 0.9], weights=[1.0, 0.5, 0.75]),
    "dare_linear": dict(density=0.4, seed=7),
    "dare_ties": dict(density=[0.3, 0.6, 0.8], seed=3),
    "breadcrumbs": dict(density=0.5, gamma=0.1),
    "breadcrumbs_ties": dict(density=0.4, gamma=[0.0, 0.05, 0.2]),
    "consensus_ta": dict(consensus_k=2),
    "consensus_ties": dict(density=0.5, consensus_k=2),
    "ffg": dict(density=0.2),
    "ota": dict(ota_normalize="global"),
    "ota_ffg": dict(density=0.3, power=0.5),
}
SHAPES = [(1,), (7,), (33, 17), (3, 5, 7), (1000,)]
# Relative tolerance per output dtype: one unit in the last place (the reference is rounded
# once to the output dtype, a backend's float32 result once more), plus, for every dtype, the
# float32 summation of the terms: 2^-20 of their magnitudes (assert_matches_reference).
TOLERANCE = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}
SUMMATION = 2.0 ** -20


def _params(method, n):
    p = dict(METHOD_PARAMS[method])
    for key in ("weights", "density", "gamma"):
        if isinstance(p.get(key), list):
            p[key] = p[key][:n]
    return p


def _run(backend, method, base, models, vs, **params):
    dev = backend_device(backend)
    out = fm.merge_tensors(base.to(dev), [m.to(dev) for m in models], method,
                           second_moments=None if vs is None else [v.to(dev) for v in vs],
                           tensor_name="model.layers.3.mlp.up_proj.weight", backend=backend,
                           **params)
    assert out.device.type == torch.device(dev).type
    return out.cpu()


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, method, n, shape):
    base, models, vs = make_finetunes(shape, n, ("bf16", "fp16", "fp32"), seed=n + len(shape),
                                      second_moments=True)
    params = _params(method, n)
    out = _run(backend, method, base, models, vs, **params)
    assert_matches_reference(out, base, models, method, second_moments=vs,
                             tensor_name="model.layers.3.mlp.up_proj.weight", **params)


@pytest.mark.parametrize("dtypes", [("bf16",), ("fp16",), ("fp32",), ("fp32", "bf16")], ids=str)
@pytest.mark.parametrize("out_dtype", ["bf16", "fp16", "fp32"])
def test_dtypes(backend, dtypes, out_dtype):
    base, models, _ = make_finetunes((61, 9), 2, dtypes, seed=5)
    params = dict(density=0.35, weights=[0.6, 0.4])
    out = _run(backend, "ties", base, models, None, out_dtype=DTYPES[out_dtype], **params)
    assert_matches_reference(out, base, models, "ties", out_dtype=DTYPES[out_dtype],
                             tensor_name="model.layers.3.mlp.up_proj.weight", **params)


def _mask_via_output(backend, method, base, models_one, **params):
    """The backend's keep-mask of one model: with base 0 and weight 1, out != 0 iff kept."""
    out = _run(backend, method, torch.zeros_like(base), models_one, None, out_dtype=torch.float32,
               rescale=None, **params)
    return out != 0


@pytest.mark.parametrize("method,params", [
    ("magnitude_prune", dict(density=0.25)),
    ("breadcrumbs", dict(density=0.3, gamma=0.1)),
    ("dare_linear", dict(density=0.5, seed=11)),
])
def test_masks_identical(backend, method, params):
    # integers-valued bf16 task vectors: many exact ties at the threshold
    g = torch.Generator().manual_seed(0)
    t = torch.randint(-20, 21, (257, 31), generator=g).to(torch.bfloat16)
    t[t == 0] = 1
    got = _mask_via_output(backend, method, t, [t], **params)
    want, _ = reference_masks(torch.zeros_like(t), [t], method, tensor_name=
                              "model.layers.3.mlp.up_proj.weight", **params)
    assert torch.equal(got, want[0])


def test_all_equal_and_all_zero(backend):
    base = torch.ones(50, dtype=torch.bfloat16)
    same = [base.clone(), base.clone()]
    for method in ("ties", "breadcrumbs_ties", "dare_ties", "magnitude_prune"):
        out = _run(backend, method, base, same, None, density=0.3)
        assert torch.equal(out, base), method
    equal_mag = [base + 0.5, base - 0.5]  # every |t| equal: all tied, all kept
    out = _run(backend, "ties", base, equal_mag, None, density=0.1)
    assert_matches_reference(out, base, equal_mag, "ties", density=0.1,
                             tensor_name="model.layers.3.mlp.up_proj.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_nonfinite_rejected_naming_tensor(backend, bad):
    base, models, _ = make_finetunes((40,), 2)
    models[1][3] = bad
    for method in ("ties", "task_arithmetic"):
        with pytest.raises(ValueError, match=r"model 1 .*model.layers.3.mlp.up_proj.weight.*NaN"):
            _run(backend, method, base, models, None, density=0.5)


@pytest.mark.parametrize("out_dtype", sorted(TOLERANCE, key=str), ids=str)
def test_weighted_sum_within_the_dtype_tolerance(backend, out_dtype):
    """No selection: every element of task_arithmetic is within TOLERANCE[out_dtype] of the
    float64 reference, relative to the value, plus SUMMATION of the terms' magnitudes."""
    from fastmerge.testing import reference_with_aux
    base, models, _ = make_finetunes((129, 5), 3, ("fp32",), seed=11)
    params = dict(weights=[0.7, 1.0, 0.3], lambda_=0.9)
    out = _run(backend, "task_arithmetic", base, models, None, out_dtype=out_dtype, **params)
    _, ref, aux = reference_with_aux(base, models, "task_arithmetic", **params)
    tol = TOLERANCE[out_dtype] * ref.abs() + SUMMATION * (aux["base_abs"] + aux["term_mag"])
    assert ((out.to(torch.float64) - ref).abs() <= tol).all()


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_density_extremes(backend, density):
    base, models, _ = make_finetunes((45, 3), 3, seed=9)
    for method in ("ties", "dare_ties", "breadcrumbs"):
        out = _run(backend, method, base, models, None, density=density)
        assert_matches_reference(out, base, models, method, density=density,
                                 tensor_name="model.layers.3.mlp.up_proj.weight")
