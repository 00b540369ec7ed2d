"""mergekit's own methods end to end: ``fastmerge merge`` (the CLI's pipeline, torch-free where
the method is a linear combination) against mergekit 0.1.5's merge (what ``mergekit-yaml``
runs) on tiny float32 llama checkpoints; the fast linear route against the float32 reference;
config errors. Semantics: docs/semantics.md ("mergekit's own methods")."""
from __future__ import annotations

import os

import pytest
import torch
from engine_util import load_dir
from mergekit_util import assert_close, run_mergekit, write_tiny_llamas

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_tiny_llamas(tmp_path_factory.mktemp("mkm"), ("base", "ft0", "ft1", "ft2"),
                             0.01, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                             max_position_embeddings=32, tie_word_embeddings=False)


def _config(ckpts, method, models, params=None, per_model=None, base=True):
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": ckpts[m], **({"parameters": per_model[i]} if per_model else {})}
                      for i, m in enumerate(models)]}
    if base:
        cfg["base_model"] = ckpts["base"]
    if params:
        cfg["parameters"] = params
    return cfg


def run_fastmerge(cfg, out, **kw):
    from fastmerge.pipeline.native import merge
    merge(cfg, out, **kw)
    return load_dir(out)


W2 = [{"weight": 0.7}, {"weight": 0.4}]
W3 = [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]
CASES = {
    "slerp": ("slerp", ["ft0"], {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                       {"value": 0.3}]}, None, True),
    "nuslerp_base": ("nuslerp", ["ft0", "ft1"], None, W2, True),
    "nuslerp_rows": ("nuslerp", ["ft0", "ft1"], {"nuslerp_flatten": False}, W2, False),
    "nuslerp_cols": ("nuslerp", ["ft0", "ft1"], {"nuslerp_flatten": False,
                                                 "nuslerp_row_wise": True}, W2, True),
    "multislerp": ("multislerp", ["ft0", "ft1", "ft2"], None, W3, True),
    "karcher": ("karcher", ["ft0", "ft1", "ft2"], {"max_iter": 20}, None, True),
    "model_stock": ("model_stock", ["ft0", "ft1", "ft2"], None, None, True),
    "model_stock_fw": ("model_stock", ["ft0", "ft1"], {"filter_wise": True}, None, True),
    "della_dense": ("della", ["ft0", "ft1"], {"lambda": 0.9}, [{"weight": 0.6, "density": 1.0},
                                                               {"weight": 0.5}], True),
    "sce": ("sce", ["ft0", "ft1", "ft2"], {"select_topk": 0.5}, None, True),
    "nearswap": ("nearswap", ["ft0"], {"t": 0.005}, None, True),
    "arcee_fusion": ("arcee_fusion", ["ft0"], None, None, True),
    "ram": ("ram", ["ft0", "ft1"], {"epsilon": 0.008}, None, True),
    "ramplus_tl": ("ramplus_tl", ["ft0", "ft1"], {"epsilon": 0.008, "r": 0.5}, None, True),
    "passthrough": ("passthrough", ["ft0"], None,
                    [{"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.5}]}], False),
}
SLOW = {"nuslerp_rows", "nuslerp_cols", "model_stock_fw", "sce", "arcee_fusion", "ramplus_tl",
        "karcher", "nearswap"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                  for c in CASES])
def test_matches_mergekit(ckpts, tmp_path, case):
    method, models, params, per_model, base = CASES[case]
    cfg = _config(ckpts, method, models, params, per_model, base)
    want = run_mergekit(cfg, tmp_path / "mk", seed=0)
    got = run_fastmerge(cfg, tmp_path / "fm")
    assert_close(got, want)


def test_della_in_distribution(ckpts, tmp_path):
    """della's draws are fastmerge's generator: same seed, same output; kept fraction and the
    L1 rescale as mergekit's, per model."""
    cfg = _config(ckpts, "della_linear", ["ft0", "ft1"], {"normalize": False},
                  [{"weight": 1.0, "density": 0.4, "epsilon": 0.1}, {"weight": 0.0}])
    got = run_fastmerge(cfg, tmp_path / "a", seed=3)
    again = run_fastmerge(cfg, tmp_path / "b", seed=3)
    other = run_fastmerge(cfg, tmp_path / "c", seed=4)
    base, ft0 = load_dir(ckpts["base"]), load_dir(ckpts["ft0"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[name], again[name]) and not torch.equal(got[name], other[name])
    delta, kept = ft0[name] - base[name], got[name] - base[name]
    frac = float((kept != 0).float().mean())
    assert abs(frac - 0.4) < 5 * (0.4 * 0.6 / delta.numel()) ** 0.5
    assert abs(float(kept.abs().sum() / delta.abs().sum()) - 1) < 1e-4   # L1 rescaled
    mask = kept != 0   # the larger half of each row survives more often (rank-dependent p)
    big = delta.abs() >= delta.abs().median(dim=1, keepdim=True).values
    assert float(mask[big].float().mean()) > float(mask[~big].float().mean()) + 0.05


def test_linear_route_without_torch(ckpts, tmp_path):
    """slerp, karcher, model_stock, ... run on fastmerge._core: the CLI imports no torch."""
    import subprocess
    import sys

    import yaml

    from fastmerge.pipeline.native import core
    if core() is None:
        pytest.skip("fastmerge._core is not built")
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_config(ckpts, "model_stock", ["ft0", "ft1", "ft2"])))
    code = ("import sys; from fastmerge.cli import main; "
            f"rc = main(['merge', {str(path)!r}, {str(tmp_path / 'o')!r}, '--quiet']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr[-2000:]


def test_torch_backend_and_api(ckpts, tmp_path):
    """merge_checkpoints (TorchKernels) gives the CLI's output; merge_tensors takes the names."""
    from fastmerge import merge_checkpoints, merge_tensors
    cfg = _config(ckpts, "slerp", ["ft0"], {"t": 0.4})
    a = run_fastmerge(cfg, tmp_path / "cli")
    merge_checkpoints(cfg, tmp_path / "api", backend="torch")
    b = load_dir(tmp_path / "api")
    assert_close(b, a, rtol=2.0 ** -22)
    base, ft0 = load_dir(ckpts["base"]), load_dir(ckpts["ft0"])
    name = "model.layers.1.self_attn.q_proj.weight"
    one = merge_tensors(base[name], [ft0[name]], "slerp", parameters={"t": 0.4},
                        tensor_name=name)
    assert_close({name: one}, {name: a[name]})


# ----------------------------------------------------------------------------- fast route
def fast_route(method_name, base, models, params, dtype, seed=0):
    """The pipeline's linear route on in-memory tensors: the Gram pre-pass (both kernels'
    forms), the method's coefficients, the fused weighted sum of backend "cpu"."""
    import types

    import numpy as np

    from fastmerge import merge_tensors
    from fastmerge.methods.core import Job
    from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
    from fastmerge.pipeline.core_kernels import CoreKernels
    from fastmerge.pipeline.method_pass import CoreOps, TorchOps
    method = MERGEKIT_METHODS[method_name]
    has_base, n = method.view(base is not None, len(models))
    with_base = base is not None and method.schema.base != "ignored"
    job = Job(tuple(models[0].shape), method.schema.resolve(params, n), "t", seed, has_base, n)
    comb = method.combination(job)
    assert comb is not None
    gram = None
    if comb.gram:
        ch = types.SimpleNamespace(base=base, models=models, offset=0)
        gram = TorchOps.gram(ch, comb.gram == "tasks", with_base)
        st = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
        as_bytes = types.SimpleNamespace(
            base=None if base is None else memoryview(base.reshape(-1).view(torch.uint8).numpy()),
            models=[memoryview(m.reshape(-1).view(torch.uint8).numpy()) for m in models],
            base_st=st, model_sts=[st] * len(models), numel=models[0].numel())
        np.testing.assert_allclose(CoreOps(CoreKernels()).gram(as_bytes, comb.gram == "tasks",
                                                               with_base),
                                   gram, rtol=1e-12, atol=1e-300)
    coeffs = comb.coefficients(gram)
    inputs = list(models) + ([base] if with_base else [])
    return merge_tensors(None, inputs, "linear", weights=coeffs, normalize=False,
                         backend="cpu", out_dtype=torch.float32)


def _edge_inputs(kind, shape, dtype, n, g):
    base = torch.randn(shape, generator=g)
    models = [base + 0.3 * torch.randn(shape, generator=g) for _ in range(n)]
    if kind == "zero_base":
        base = torch.zeros(shape)
    elif kind == "zero_models":
        models = [torch.zeros(shape) for _ in models]
    elif kind == "antiparallel":
        models = [-base * (i + 1) for i in range(n)]
    elif kind == "same":
        models = [base.clone() for _ in models]
    elif kind == "antipodal_tasks":
        d = torch.randn(shape, generator=g)
        models = [base + d if i % 2 == 0 else base - d for i in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


LINEAR_CASES = [("slerp", 1, {"t": 0.3}), ("slerp", 1, {"t": 1.0}),
                ("nuslerp", 2, {"weight": [0.6, 0.2]}),
                ("multislerp", 3, {"weight": [0.5, 0.3, 0.2]}),
                ("multislerp", 2, {"weight": [1.0, 1.0]}),
                ("karcher", 3, {}), ("karcher", 2, {"max_iter": 0}),
                ("model_stock", 3, {}), ("passthrough", 1, {"scale": 0.5})]
EDGES = ["random", "zero_base", "zero_models", "antiparallel", "same", "antipodal_tasks"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (4, 3, 5)])
@pytest.mark.parametrize("case", range(len(LINEAR_CASES)))
def test_fast_route_matches_reference(case, shape, dtype):
    from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
    name, n, params = LINEAR_CASES[case]
    g = torch.Generator().manual_seed(case * 100 + len(shape))
    for edge in EDGES:
        base, models = _edge_inputs(edge, shape, dtype, n, g)
        for with_base in ([True, False] if name in ("nuslerp", "multislerp", "karcher")
                          else [True]):
            b = base if with_base else None
            want = MERGEKIT_METHODS[name].merge(b, models, params)
            got = fast_route(name, b, models, params, dtype)
            scale = max(float(x.float().abs().max()) for x in [base, *models]) or 1.0
            err = float((got - want).abs().max())
            # within a bf16 ulp of the inputs' scale: the route sums c_k V_k where the
            # reference forms task vectors first, so near-antipodal inputs (large |c_k|)
            # cancel differently in float32
            assert err <= 2.0 ** -10 * scale, (name, edge, with_base, err, scale)


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("text,key", [
    ("merge_method: slerp\nbase_model: a\nmodels: [b]\nparameters: {t: 1.5}", "parameters.t"),
    ("merge_method: slerp\nbase_model: a\nmodels: [b]\nparameters: {t: [0, 1.2]}",
     "parameters.t[1]"),
    ("merge_method: slerp\nbase_model: a\nmodels: [b]\nparameters: "
     "{t: [{filter: mlp, value: -0.1}]}", "parameters.t[0].value"),
    ("merge_method: slerp\nmodels: [a, b]\nparameters: {t: 0.5}", "base_model"),
    ("merge_method: slerp\nbase_model: a\nmodels: [b, c]\nparameters: {t: 0.5}", "models"),
    ("merge_method: model_stock\nbase_model: a\nmodels: [b]", "models"),
    ("merge_method: nuslerp\nmodels: [a, b, c]\nparameters: {weight: 1}", "models"),
    ("merge_method: della\nmodels: [a, b]\nparameters: {weight: 1}", "base_model"),
    ("merge_method: nearswap\nbase_model: a\nmodels: [b]\nparameters: {t: -1}", "parameters.t"),
    ("merge_method: ramplus_tl\nbase_model: a\nmodels: [b]\nparameters: {alpha: -1}",
     "parameters.alpha"),
    ("merge_method: sce\nbase_model: a\nmodels: [b]\nparameters: {select_topk: 2}",
     "parameters.select_topk"),
    ("merge_method: karcher\nmodels: [a, b]\nparameters: {weight: 1}", "parameters"),
    ("merge_method: nuslerp\nmodels: [{model: a, parameters: {nuslerp_flatten: false}}, b]",
     "models[0].parameters"),
    ("merge_method: slerp\nbase_model: a\nmodels: [b]\nparameters: {t: 0.5}\nscope: model",
     "scope"),
    ("merge_method: slerp\nbase_model: a\nmodels: [b]\nparameters: {t: 0.5}\n"
     "lines: {beta: 1}", "lines"),
])
def test_config_errors_name_the_key(text, key):
    from fastmerge.recipe.config import ConfigError, load_config
    with pytest.raises(ConfigError) as exc:
        load_config(text)
    msg = str(exc.value)
    assert "\n" not in msg and key in msg, msg


@pytest.mark.parametrize("text,key", [
    ("merge_method: slerp\nbase_model: a\nmodels: [b]", "'t' is required"),
    ("merge_method: della\nbase_model: a\nmodels: [b]\nparameters: "
     "{weight: 1, density: 0.5, epsilon: 0.6}", "epsilon"),
    ("merge_method: multislerp\nmodels: [{model: a, parameters: {weight: 1}}, "
     "{model: b, parameters: {weight: -1}}]", "weight sums to 0"),
])
def test_per_tensor_errors_name_the_tensor(text, key):
    from fastmerge.recipe.config import ConfigError, ParameterResolver, load_config
    cfg = load_config(text)
    with pytest.raises(ConfigError) as exc:
        ParameterResolver(cfg, ["x.weight"]).spec_for("x.weight")
    assert key in str(exc.value) and "'x.weight'" in str(exc.value), str(exc.value)


def test_methods_command_lists_every_method(capsys):
    from fastmerge.cli import main
    from fastmerge.methods import METHODS
    from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in [*METHODS, *MERGEKIT_METHODS]:
        assert f"\n  {name}" in out, name
    assert "t                  global     default required  [0, 1]" in out


INTEGRATION = ["slerp", "nuslerp_base", "multislerp", "karcher", "model_stock", "della_dense",
               "sce", "nearswap", "arcee_fusion", "ram", "passthrough"]


@pytest.mark.slow
@pytest.mark.parametrize("case", INTEGRATION)
def test_mergekit_integration_routes(ckpts, tmp_path, case):
    """Inside mergekit's own pipeline (what mergekit-yaml runs), the patched methods run
    fastmerge's implementation and give mergekit's output."""
    import fastmerge.integrations.mergekit as fm_mk
    method, models, params, per_model, base = CASES[case]
    cfg = _config(ckpts, method, models, params, per_model, base)
    want = run_mergekit(cfg, tmp_path / "mk", seed=0)
    fm_mk.reset_stats()
    with fm_mk.patched():
        got = run_mergekit(cfg, tmp_path / "fm", seed=0)
    st = fm_mk.stats()
    assert st and all(k.startswith(f"fastmerge:{method}") for k in st), st
    assert_close(got, want)


@pytest.mark.slow
def test_torchrun_keeps_tensors_whole(ckpts, tmp_path):
    """Under torchrun each tensor of a mergekit method is merged whole by one rank: the output
    is byte for byte the single-process one (della: same draws for the same seed)."""
    import subprocess
    import sys

    import yaml
    cfg = _config(ckpts, "della", ["ft0", "ft1"], None,
                  [{"weight": 0.6, "density": 0.5, "epsilon": 0.1}, {"weight": 0.5}])
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "-m", "fastmerge", "merge", str(path), str(tmp_path / "tr"), "--quiet",
                        "--seed", "5"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    single = run_fastmerge(cfg, tmp_path / "one", seed=5)
    got = load_dir(tmp_path / "tr")
    assert set(got) == set(single) and all(torch.equal(got[k], single[k]) for k in got)
