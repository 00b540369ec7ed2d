"""mergekit 0.1.5's own methods: fastmerge's float32 references against mergekit's own code.

Every method is compared with mergekit's public MergeMethod call on float32 copies of the same
inputs (the contract's reference), over shapes, input dtypes and edge cases; chunked
application must equal whole-tensor application. della's draws come from fastmerge's Philox
generator, so it is compared with mergekit exactly with the draws injected into mergekit's
``torch.bernoulli``, and in distribution with mergekit's own draws.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastmerge.methods import METHODS, resolve_spec
from fastmerge.methods.della import DELLA, DELLA_LINEAR, della_mask, keep_thresholds
from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS, mergekit_method

SHAPES = [(1,), (7,), (5, 13), (1, 9), (9, 1), (2, 3, 4)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (method, parameters, non-base models, base?) for the sweep over shapes and dtypes.
CASES = [
    ("slerp", {"t": 0.3}, 1, True),
    ("slerp", {"t": 1.0}, 1, True),
    ("nuslerp", {"weight": [1.0, 2.0]}, 2, True),
    ("nuslerp", {"weight": [1.0, 3.0]}, 2, False),
    ("nuslerp", {"weight": [1.0, 2.0], "nuslerp_flatten": False}, 2, True),
    ("nuslerp", {"weight": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True},
     2, True),
    ("nuslerp", {"weight": [1.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True},
     2, False),
    ("multislerp", {"weight": [1.0, 2.0, 0.5]}, 3, True),
    ("multislerp", {"weight": [0.2, 0.7], "normalize_weights": False}, 2, False),
    ("multislerp", {"weight": 1.0}, 1, True),
    ("karcher", {}, 3, True),
    ("karcher", {"max_iter": 2, "tol": 1e-4}, 2, False),
    ("model_stock", {}, 3, True),
    ("model_stock", {"filter_wise": True}, 2, True),
    ("sce", {}, 3, True),
    ("sce", {"select_topk": 0.5}, 3, True),
    ("nearswap", {"t": 0.3}, 1, True),
    ("arcee_fusion", {}, 1, True),
    ("ram", {}, 3, True),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5}, 3, True),
    ("passthrough", {"scale": 0.5}, 1, False),
    ("passthrough", {}, 1, False),
    ("della", {"weight": [1.0, 0.5], "density": 1.0}, 2, True),
    ("della_linear", {"weight": [1.0, 0.5], "normalize": True}, 2, True),
]


# ----------------------------------------------------------------------------- helpers

def _mergekit():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    return registry, TensorGroup


def mergekit_merge(name, base, models, params):
    """mergekit's own merge of one tensor, on float32 copies (karcher takes the base last)."""
    registry, TensorGroup = _mergekit()
    models = [m.float() for m in models]
    if name in ("karcher", "passthrough"):
        tensors, base_index = models + ([base.float()] if base is not None else []), None
    elif base is None:
        tensors, base_index = models, None
    else:
        tensors, base_index = [base.float()] + models, 0
    group = TensorGroup.from_tensors(tensors, base_index=base_index, name="w")
    (out,) = registry.get(name)([group], parameters=params, dtype=torch.float32)
    return out


def inputs(shape, n, with_base, dtype, seed=0, sparse=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype) if with_base else None
    models = []
    for _ in range(n):
        delta = torch.randn(shape, generator=g)
        if sparse:  # ram counts which models changed an element: leave some unchanged
            delta = delta * (torch.rand(shape, generator=g) < 0.5)
        models.append(((base.float() if with_base else 0) + delta).to(dtype))
    return base, models


def assert_close(ours, ref, rtol=2e-5):
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(ours, ref.float(), rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------- the sweep

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{sorted(c[1].items())}")
def test_matches_mergekit(case, shape, dtype):
    name, params, n, with_base = case
    if name in ("sce", "arcee_fusion") and dtype != torch.float32:
        pytest.skip("threshold ties are likely in low-precision inputs; checked on float32")
    base, models = inputs(shape, n, with_base, dtype, sparse=name.startswith("ram"))
    method = mergekit_method(name)
    ours = method.merge(base, models, params, name="w")
    assert ours.dtype == torch.float32 and ours.shape == torch.Size(shape)
    chunked = method.merge(base, models, params, name="w", chunk_elems=4)
    assert_close(chunked, ours, rtol=1e-6)
    assert_close(ours, mergekit_merge(name, base, models, params))


def test_registry_covers_mergekit():
    registry, _ = _mergekit()
    theirs = {m.spec.name for m in registry.registered_methods()}
    assert theirs - set(METHODS) == set(MERGEKIT_METHODS)
    for name, method in MERGEKIT_METHODS.items():
        ours = {p.name for p in method.schema.params}
        spec = {p.name for p in registry.get(name).spec.parameters}
        assert ours == spec, name
        assert method.reductions


def test_existing_methods_resolve_as_before():
    assert resolve_spec("ties", 2).combine == "ties"
    with pytest.raises(ValueError, match="unknown merge method 'slerp'"):
        resolve_spec("slerp", 2)


# ----------------------------------------------------------------------------- edge cases

def _vec(*values):
    return torch.tensor(values, dtype=torch.float32)


SLERP_EDGES = {
    "zero_base": (_vec(0, 0, 0), _vec(1, 2, 3)),
    "zero_model": (_vec(1, 2, 3), _vec(0, 0, 0)),
    "both_zero": (_vec(0, 0, 0), _vec(0, 0, 0)),
    "parallel": (_vec(1, 2, 3), _vec(2, 4, 6)),
    "antiparallel": (_vec(1, 2, 3), _vec(-1, -2, -3)),
    "equal": (_vec(1, 2, 3), _vec(1, 2, 3)),
    "empty": (torch.zeros(0), torch.zeros(0)),
}


@pytest.mark.parametrize("t", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("edge", SLERP_EDGES, ids=str)
def test_slerp_edges(edge, t):
    v0, v1 = SLERP_EDGES[edge]
    ours = mergekit_method("slerp").merge(v0, [v1], {"t": t})
    assert_close(ours, mergekit_merge("slerp", v0, [v1], {"t": t}))
    if edge == "zero_base":  # defined: orthogonal, as mergekit
        assert_close(ours, math.sin(t * math.pi / 2) * v1)


@pytest.mark.parametrize("edge", ["zero_base", "zero_model", "parallel", "equal"])
@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_edges(edge, flatten):
    v0, v1 = (v.reshape(1, 3) for v in SLERP_EDGES[edge])
    params = {"weight": [3.0, 1.0], "nuslerp_flatten": flatten}
    ours = mergekit_method("nuslerp").merge(None, [v0, v1], params)
    assert_close(ours, mergekit_merge("nuslerp", None, [v0, v1], params))


def test_nuslerp_antiparallel_is_linear():
    v0 = torch.randn(64)
    for w in ([1.0, 1.0], [3.0, 1.0]):
        t = w[1] / sum(w)
        ours = mergekit_method("nuslerp").merge(None, [v0, -v0], {"weight": w})
        assert_close(ours, (1 - 2 * t) * v0)  # defined: colinear pairs interpolate linearly
    ours = mergekit_method("nuslerp").merge(None, [v0, -v0], {"weight": [1.0, 1.0]})
    assert_close(ours, mergekit_merge("nuslerp", None, [v0, -v0], {"weight": [1.0, 1.0]}))


def test_multislerp_zero_mean_falls_back_to_linear():
    base = torch.randn(10)
    models = [base.clone() for _ in range(3)]  # zero deltas: mergekit raises for 3 inputs
    params = {"weight": [1.0, 1.0, 2.0]}
    with pytest.raises(ValueError, match="weighted sum"):
        mergekit_merge("multislerp", base, models, params)
    assert torch.equal(mergekit_method("multislerp").merge(base, models, params), base)
    x = torch.randn(10)
    pair = [x, -x]  # exactly antipodal, equal weights: 0 (mergekit's fallback too)
    ours = mergekit_method("multislerp").merge(None, pair, {"weight": [1.0, 1.0]})
    assert_close(ours, mergekit_merge("multislerp", None, pair, {"weight": [1.0, 1.0]}))
    assert torch.equal(ours, torch.zeros(10))


def test_multislerp_weights_summing_to_zero():
    with pytest.raises(ValueError, match="multislerp: weight sums to 0"):
        mergekit_method("multislerp").merge(None, [torch.ones(3), torch.zeros(3)],
                                            {"weight": [1.0, -1.0]})


@pytest.mark.parametrize("max_iter", [0, 1, 50])
def test_karcher_edges(max_iter):
    x = torch.randn(4, 6)
    params = {"max_iter": max_iter}
    cases = [[x, -x], [x, torch.zeros_like(x)], [torch.zeros_like(x)] * 2, [x, 2 * x, x]]
    for models in cases:
        ours = mergekit_method("karcher").merge(None, models, params)
        assert_close(ours, mergekit_merge("karcher", None, models, params))
    assert_close(mergekit_method("karcher").merge(None, [x, -x], params), x)  # mean norm * u_1


def test_model_stock_edges():
    base = torch.randn(3, 8)
    d = torch.randn(3, 8)
    for models in ([base, base, base], [base + d, base + 2 * d], [base + d, base - d],
                   [base + d, base + d, base - d]):
        for fw in (False, True):
            ours = mergekit_method("model_stock").merge(base, models, {"filter_wise": fw})
            assert_close(ours, mergekit_merge("model_stock", base, models, {"filter_wise": fw}),
                         rtol=1e-4)
    same = mergekit_method("model_stock").merge(base, [base, base], {})
    assert torch.equal(same, base)


def test_sce_and_ram_edges():
    base = torch.randn(4, 5)
    for name, params in (("sce", {"select_topk": 0.0}), ("sce", {"select_topk": 0.5}),
                         ("ram", {}), ("ramplus_tl", {})):
        for models in ([base.clone(), base.clone()], [base + 1e-9, base], [base]):
            ours = mergekit_method(name).merge(base, models, params)
            assert_close(ours, mergekit_merge(name, base, models, params))
    assert torch.equal(mergekit_method("ram").merge(base, [], {}), base)


def test_ramplus_without_unique_elements_and_zero_epsilon():
    base = torch.zeros(6)
    models = [torch.ones(6), torch.ones(6)]  # every change shared: U_i = 0
    out = mergekit_method("ramplus_tl").merge(base, models, {"epsilon": 0.0})
    assert torch.equal(out, torch.ones(6))


def test_sce_keeps_all_ties():
    base = torch.zeros(8)
    models = [torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]), torch.zeros(8)]
    out = mergekit_method("sce").merge(base, models, {"select_topk": 0.5})
    assert torch.equal(out, models[0])  # k = 2 of 4 tied variances: all four kept


def test_nearswap_and_fusion_edges():
    base = torch.randn(3, 5)
    for model in (base.clone(), base + 1e-7, base + torch.randn(3, 5)):
        for t in (0.0, 1e-4, 2.0):
            ours = mergekit_method("nearswap").merge(base, [model], {"t": t})
            assert_close(ours, mergekit_merge("nearswap", base, [model], {"t": t}))
        ours = mergekit_method("arcee_fusion").merge(base, [model], {})
        assert_close(ours, mergekit_merge("arcee_fusion", base, [model], {}))


@pytest.mark.parametrize("name", sorted(MERGEKIT_METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_names_the_tensor(name, bad):
    method = mergekit_method(name)
    n = max(method.schema.min_models, 1) if name != "model_stock" else 2
    base, models = inputs((3, 4), n, method.schema.base != "ignored", torch.float32)
    models[-1][1, 2] = bad
    params = {"t": 0.5} if name in ("slerp", "nearswap") else {}
    if any(p.name == "weight" for p in method.schema.params):
        params["weight"] = 1.0
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.w'.*NaN/Inf"):
        method.merge(base, models, params, name="model.layers.0.w")


@pytest.mark.parametrize("name, base, n, params, message", [
    ("slerp", True, 1, {}, "slerp: parameter 't' is required"),
    ("slerp", True, 1, {"t": 1.5}, "slerp: t must be <= 1.0"),
    ("slerp", False, 1, {"t": 0.5}, "slerp needs a base_model"),
    ("slerp", True, 2, {"t": 0.5}, "slerp takes at most 1 models besides the base, got 2"),
    ("model_stock", True, 1, {}, "model_stock needs at least 2 models"),
    ("nuslerp", False, 2, {"weight": [1.0]}, "nuslerp: weight has 1 entries"),
    ("nearswap", True, 1, {"t": -1}, "nearswap: t must be >= 0.0"),
    ("karcher", False, 2, {"tol": 0}, "karcher: tol must be > 0.0"),
    ("della", True, 1, {"weight": 1, "density": 0.1}, r"della: epsilon\[0\] = 0.15 must keep"),
    ("della", True, 1, {"weight": 1, "lambda_": 1}, "della: unknown parameter 'lambda_'"),
    ("passthrough", False, 2, {}, "passthrough takes at most 1 inputs"),
])
def test_config_errors_are_one_line(name, base, n, params, message):
    b, models = inputs((4,), n, base, torch.float32)
    with pytest.raises(ValueError, match=message) as err:
        mergekit_method(name).merge(b, models, params)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- della

def _inject_masks(monkeypatch, masks):
    """mergekit's della with fastmerge's masks in place of torch.bernoulli's draws; also checks
    that mergekit's keep probabilities are fastmerge's."""
    import mergekit.sparsify as sparsify
    queue = list(masks)

    class _Torch:
        def __getattr__(self, attr):
            return getattr(torch, attr)

        @staticmethod
        def bernoulli(probs):
            mask, thresholds = queue.pop(0)
            ours = thresholds.reshape(probs.shape).double() / 2 ** 32
            torch.testing.assert_close(probs.double(), ours, rtol=0, atol=1e-6)
            return mask.reshape(probs.shape).to(probs.dtype)

    monkeypatch.setattr(sparsify, "torch", _Torch())


@pytest.mark.parametrize("method", [DELLA, DELLA_LINEAR], ids=lambda m: m.name)
@pytest.mark.parametrize("shape", [(7,), (6, 11), (1, 33)], ids=str)
@pytest.mark.parametrize("extra", [{}, {"rescale": False, "lambda": 0.7}, {"normalize": True}],
                         ids=str)
def test_della_matches_mergekit_with_our_draws(monkeypatch, method, shape, extra):
    base, models = inputs(shape, 3, True, torch.float32, seed=3)
    params = {"weight": [1.0, 0.6, -0.3], "density": [0.5, 0.3, 0.7],
              "epsilon": [0.1, 0.2, 0.05], **extra}
    ours = method.merge(base, models, params, name="w", seed=11)
    rows = shape[-1] if len(shape) > 1 else shape[0]
    masks = []
    for i, m in enumerate(models):
        d = (m - base).reshape(-1)
        masks.append((della_mask(d, 0, rows, params["density"][i], params["epsilon"][i], 11,
                                 "w", i),
                      keep_thresholds(d.reshape(-1, rows), params["density"][i],
                                      params["epsilon"][i])))
    _inject_masks(monkeypatch, masks)
    assert_close(ours, mergekit_merge(method.name, base, models, params))


def test_della_same_seed_same_output_and_chunking():
    base, models = inputs((16, 40), 2, True, torch.bfloat16, seed=5)
    params = {"weight": [1.0, 0.5], "density": 0.4, "epsilon": 0.2}
    a = DELLA.merge(base, models, params, name="x", seed=7)
    assert torch.equal(a, DELLA.merge(base, models, params, name="x", seed=7))
    assert torch.equal(a, DELLA.merge(base, models, params, name="x", seed=7, chunk_elems=120))
    assert not torch.equal(a, DELLA.merge(base, models, params, name="x", seed=8))
    assert not torch.equal(a, DELLA.merge(base, models, params, name="y", seed=7))


def test_della_edges():
    base, models = inputs((5, 1), 1, True, torch.float32)
    # rows of length 1: p = density (mergekit divides 0 by 0 and torch.bernoulli fails)
    out = DELLA_LINEAR.merge(base, models, {"weight": 1.0, "density": 0.5, "rescale": False})
    assert torch.isfinite(out).all()
    # epsilon 0: every element drawn with p = density, DARE-like
    d = torch.randn(64, 64)
    mask = della_mask(d.reshape(-1), 0, 64, 0.3, 0.0, 1, "w", 0)
    assert abs(mask.float().mean().item() - 0.3) < 5 * math.sqrt(0.21 / mask.numel())
    # density 1: task arithmetic, no draws (mergekit gives the same)
    base, models = inputs((4, 6), 2, True, torch.float32)
    ours = DELLA.merge(base, models, {"weight": [1.0, 2.0], "density": 1.0})
    assert_close(ours, mergekit_merge("della", base, models, {"weight": [1.0, 2.0],
                                                              "density": 1.0}))
    zero = DELLA.merge(base, models, {"weight": [1.0, 2.0], "density": 0.0})
    assert torch.equal(zero, base)


def _della_stats(delta, pruned):
    """Kept fraction overall and in the largest / smallest magnitude quartiles per row, and
    the mean |update|."""
    kept = pruned != 0
    order = delta.abs().argsort(dim=1)
    q = delta.shape[1] // 4
    low = kept.gather(1, order[:, :q]).float().mean().item()
    high = kept.gather(1, order[:, -q:]).float().mean().item()
    return kept.float().mean().item(), low, high, pruned.abs().mean().item()


@pytest.mark.parametrize("rescale", [False, True])
def test_della_matches_mergekit_in_distribution(rescale):
    """Fixed seeds on both sides, so deterministic; bounds are 5 binomial sigmas."""
    rows, cols, density, eps = 64, 256, 0.4, 0.15
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(rows, cols)
    delta = torch.randn(rows, cols, generator=g)
    params = {"weight": 1.0, "density": density, "epsilon": eps, "rescale": rescale}
    ours = DELLA_LINEAR.merge(base, [delta], params, name="w", seed=1)
    torch.manual_seed(12345)  # not 0: the global stream would replay the data's own draws
    theirs = mergekit_merge("della_linear", base, [delta], params)
    n, q = rows * cols, rows * (cols // 4)
    # expected keep probability of the bottom / top quartile of ranks
    low_p = density - eps + 2 * eps * ((cols // 4 - 1) / 2) / (cols - 1)
    high_p = density + eps - 2 * eps * ((cols // 4 - 1) / 2) / (cols - 1)
    for stats in (_della_stats(delta, ours), _della_stats(delta, theirs)):
        frac, low, high, size = stats
        assert abs(frac - density) < 5 * math.sqrt(density * (1 - density) / n)
        assert abs(low - low_p) < 5 * math.sqrt(low_p * (1 - low_p) / q)
        assert abs(high - high_p) < 5 * math.sqrt(high_p * (1 - high_p) / q)
    ours_size, theirs_size = _della_stats(delta, ours)[3], _della_stats(delta, theirs)[3]
    assert abs(ours_size - theirs_size) < 0.03 * theirs_size
    if rescale:  # the L1 norm of the task vector is kept exactly
        assert abs(ours.abs().sum().item() - delta.abs().sum().item()) < 1e-3 * n
