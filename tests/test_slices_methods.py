"""mergekit's own methods over ``slices:`` (frankenmerges with slerp, nuslerp, model_stock,
karcher, della_linear, nearswap, arcee_fusion): ``fastmerge merge`` (CLI and
``fastmerge.merge_checkpoints``) against mergekit 0.1.5's ``run_merge`` on tiny float32 Llama
checkpoints, with repeated and shifted layer ranges, per-slice and per-source parameters,
gradients and a base_model inside a slice; della's draws keyed by the output tensor name; one
torchrun merge; config errors (one line naming the key); sweeps over sliced configs, each
point byte for byte ``fastmerge merge`` of its config. Semantics: docs/semantics.md
("slices")."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from engine_util import load_dir, merge_each_point, write_yaml
from mergekit_util import assert_close, run_mergekit, write_tiny_llamas

import fastmerge
from fastmerge.cli import main
from fastmerge.recipe.config import ConfigError, parse_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LAYERS = 5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Four tiny float32 Llama checkpoints of 5 layers: b (base), x, y, z (b + noise)."""
    return write_tiny_llamas(tmp_path_factory.mktemp("slm"), ("b", "x", "y", "z"), 0.02,
                             hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                             max_position_embeddings=32, tie_word_embeddings=False)


def src(model, a, b, **params):
    d = {"model": model, "layer_range": [a, b]}
    if params:
        d["parameters"] = params
    return d


def cases(p):
    """name -> a sliced config: shifted ranges (x's layers 1..3 beside b's 0..2), a repeated
    input layer (b's layer 2 feeds output layers 2 and 3), per-slice and per-source
    parameters, and the second slice's own base_model where the method reads one."""
    b, x, y, z = p["b"], p["x"], p["y"], p["z"]

    def two(params0=None, params1=None, **top):
        return {"dtype": "float32", "base_model": b, **top,
                "slices": [{"sources": [src(b, 0, 3), src(x, 1, 4)], **(params0 or {})},
                           {"sources": [src(b, 2, 4), src(x, 0, 2)], **(params1 or {})}]}
    slerp_t = two({"parameters": {"t": [0.2, 0.9]}}, {"parameters": {"t": 0.6}},
                  parameters={"t": 0.4})
    slerp_grad = two(parameters={"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                       {"value": [1, 0.25]}]})
    # the second slice's base is x (its own base_model): slerp interpolates from x there
    slerp_slice_base = two({"parameters": {"t": 0.3}},
                           {"parameters": {"t": 0.8}, "base_model": x})
    nuslerp = {"dtype": "float32", "base_model": b, "parameters": {"weight": 0.5},
               "slices": [{"sources": [src(b, 0, 3), src(x, 1, 4, weight=[0.2, 0.9]),
                                       src(y, 2, 5)]},
                          {"sources": [src(b, 2, 4), src(x, 0, 2), src(y, 3, 5, weight=0.7)],
                           "parameters": {"weight": 0.3}}]}
    nuslerp_nobase = {"dtype": "float32",
                      "slices": [{"sources": [src(x, 0, 3, weight=0.3), src(y, 1, 4)],
                                  "parameters": {"weight": 0.6, "nuslerp_flatten": False}},
                                 {"sources": [src(y, 4, 5), src(x, 2, 3)],
                                  "parameters": {"weight": [0.1, 1]}}]}
    model_stock = {"dtype": "float32", "base_model": b,
                   "slices": [{"sources": [src(b, 0, 3), src(x, 1, 4), src(y, 2, 5)]},
                              {"sources": [src(b, 2, 4), src(y, 0, 2), src(z, 3, 5)],
                               "parameters": {"filter_wise": True}}]}
    karcher = {"dtype": "float32", "base_model": b,
               "slices": [{"sources": [src(b, 0, 3), src(x, 1, 4), src(y, 2, 5)]},
                          {"sources": [src(b, 2, 4), src(y, 0, 2)], "base_model": y}]}
    della = {"dtype": "float32", "base_model": b, "parameters": {"lambda": [0.5, 1.5]},
             "slices": [{"sources": [src(b, 0, 3), src(x, 1, 4, weight=0.7),
                                     src(y, 2, 5, weight=[0.2, 0.6])]},
                        {"sources": [src(b, 2, 4), src(x, 0, 2, weight=0.4),
                                     src(y, 3, 5, weight=0.5)],
                         "parameters": {"normalize": True}}]}
    three = {"dtype": "float32", "base_model": b,
             "slices": [{"sources": [src(b, 0, 3), src(x, 1, 4), src(y, 2, 5)]},
                        {"sources": [src(b, 2, 4), src(x, 0, 2), src(y, 3, 5)],
                         "base_model": y}]}
    multislerp = {"dtype": "float32", "parameters": {"weight": 0.4},
                  "slices": [{"sources": [src(x, 0, 3, weight=[0.1, 0.9]), src(y, 1, 4),
                                          src(z, 2, 5)]},
                             {"sources": [src(z, 3, 5), src(x, 3, 5)],
                              "parameters": {"weight": 0.7}}]}
    # mergekit's karcher ignores a base over slices: b names config.json only, slice 1's own
    # base z is none of its sources; the inputs are the sources as listed
    karcher_base_ignored = {"dtype": "float32", "base_model": b,
                            "slices": [{"sources": [src(x, 0, 3), src(y, 1, 4)]},
                                       {"sources": [src(y, 3, 5), src(x, 2, 4), src(b, 0, 2)],
                                        "base_model": z}]}
    della_full = {**della, "parameters": {"lambda": 0.8, "density": 1.0}}
    nearswap = two({"parameters": {"t": 0.01}}, {"parameters": {"t": [0.001, 0.05]}})
    arcee = two(params1={"base_model": x})
    return {"slerp": ("slerp", slerp_t), "slerp_gradient": ("slerp", slerp_grad),
            "slerp_slice_base": ("slerp", slerp_slice_base), "nuslerp": ("nuslerp", nuslerp),
            "nuslerp_nobase": ("nuslerp", nuslerp_nobase),
            "model_stock": ("model_stock", model_stock), "karcher": ("karcher", karcher),
            "karcher_base_ignored": ("karcher", karcher_base_ignored),
            "della_linear": ("della_linear", della), "nearswap": ("nearswap", nearswap),
            "multislerp": ("multislerp", multislerp), "della": ("della", della_full),
            "sce": ("sce", {**three, "parameters": {"select_topk": 0.5}}),
            "ram": ("ram", three), "ramplus_tl": ("ramplus_tl", three),
            "arcee_fusion": ("arcee_fusion", arcee)}


def config(ckpts, case):
    method, raw = cases(ckpts)[case]
    return {"merge_method": method, **raw}


@pytest.mark.parametrize("case", ["slerp", "slerp_gradient", "slerp_slice_base", "nuslerp",
                                  "nuslerp_nobase", "model_stock", "karcher",
                                  "karcher_base_ignored", "della_linear",
                                  "nearswap", "arcee_fusion", "multislerp", "della", "sce",
                                  "ram", "ramplus_tl"])
def test_matches_mergekit(ckpts, tmp_path, case, monkeypatch):
    raw = config(ckpts, case)
    want = run_mergekit(raw, tmp_path / "mk")
    out = tmp_path / "fm"
    assert main(["merge", str(write_yaml(tmp_path / "c.yml", raw)), str(out), "--quiet"]) == 0
    got = load_dir(out)
    assert_close(got, want)
    if case in ("model_stock", "arcee_fusion"):   # the torch kernels read the same routes
        monkeypatch.setenv("FASTMERGE_NATIVE", "0")
        assert main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "t"), "--quiet"]) == 0
        assert_close(load_dir(tmp_path / "t"), want)
    layers = [yaml.safe_load((d / "config.json").read_text())["num_hidden_layers"]
              for d in (out, tmp_path / "mk")]
    assert layers[0] == layers[1] == (4 if case == "nuslerp_nobase" else 5)
    if case == "slerp":   # the API: byte for byte the CLI's output
        fastmerge.merge_checkpoints(raw, tmp_path / "api")
        api = load_dir(tmp_path / "api")
        assert all(torch.equal(api[k], got[k]) for k in got)


def test_routes_and_parameters(ckpts):
    """Which inputs and parameters output layer k gets (the planner over real checkpoints)."""
    from fastmerge.pipeline.sliced import close_inputs, open_sliced
    cfg = parse_config(config(ckpts, "slerp_slice_base"))
    inputs = open_sliced(cfg)
    try:
        q = "self_attn.q_proj.weight"
        names = {c: c.dir.name for c in inputs.models}
        for out, (base, base_l, other, other_l, t) in enumerate(
                [("b", 0, "x", 1, 0.3), ("b", 1, "x", 2, 0.3), ("b", 2, "x", 3, 0.3),
                 ("x", 0, "b", 2, 0.8), ("x", 1, "b", 3, 0.8)]):
            (bc, bn), [(mc, mn)] = inputs.routes[f"model.layers.{out}.{q}"]
            assert (names[bc], bn) == (base, f"model.layers.{base_l}.{q}")
            assert (names[mc], mn) == (other, f"model.layers.{other_l}.{q}")
            assert inputs.plan.spec_for(f"model.layers.{out}.{q}").params["t"] == t
        # embeddings from the first slice (base b), norm and lm_head from the last (base x)
        (bc, _), _ = inputs.routes["model.embed_tokens.weight"]
        assert names[bc] == "b"
        for n in ("model.norm.weight", "lm_head.weight"):
            (bc, _), [(mc, _)] = inputs.routes[n]
            assert (names[bc], names[mc]) == ("x", "b")
            assert inputs.plan.spec_for(n).params["t"] == 0.8
    finally:
        close_inputs(inputs)


def test_karcher_reads_no_base_over_slices(ckpts):
    """karcher over slices: no base route; the inputs are the slice's sources in listed order
    (a named base, top-level or the slice's own, is neither required among them nor added)."""
    from fastmerge.pipeline.sliced import close_inputs, open_sliced
    inputs = open_sliced(parse_config(config(ckpts, "karcher_base_ignored")))
    try:
        names = {c: c.dir.name for c in inputs.models}
        q = "self_attn.q_proj.weight"
        for out, want in [(0, [("x", 0), ("y", 1)]), (3, [("y", 3), ("x", 2), ("b", 0)])]:
            base, models = inputs.routes[f"model.layers.{out}.{q}"]
            assert base is None
            assert [(names[c], n) for c, n in models] == \
                [(m, f"model.layers.{k}.{q}") for m, k in want]
        assert inputs.plan.config_model == ckpts["b"]
    finally:
        close_inputs(inputs)


def test_slice_base_rule_is_mergekits_per_method():
    """Which mergekit methods take a named base out of a slice's sources: mergekit 0.1.5's
    own contract (BasePolicy.IGNORED: not), method by method."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import BasePolicy

    from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
    from fastmerge.recipe.config import slice_reads_base
    for name in MERGEKIT_METHODS:
        ignored = registry.get(name).spec.contract.base == BasePolicy.IGNORED
        assert slice_reads_base(name) is not ignored, name


def test_della_draws_keyed_by_output_name(ckpts, tmp_path):
    """della's masks over slices: each output tensor's draws are the method's reference on its
    routed inputs keyed by the OUTPUT name, so a repeated input layer gets fresh draws."""
    from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
    b, x, y = ckpts["b"], ckpts["x"], ckpts["y"]
    raw = {"merge_method": "della_linear", "base_model": b, "dtype": "float32",
           "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1, "seed": 11},
           "slices": [{"sources": [src(b, 0, 2), src(x, 1, 3), src(y, 2, 4)]},
                      {"sources": [src(b, 1, 2), src(x, 2, 3), src(y, 3, 4)]}]}
    out = tmp_path / "fm"
    assert main(["merge", str(write_yaml(tmp_path / "c.yml", raw)), str(out), "--quiet"]) == 0
    got = load_dir(out)
    B, X, Y = load_dir(Path(b)), load_dir(Path(x)), load_dir(Path(y))
    ref = MERGEKIT_METHODS["della_linear"]
    q = "self_attn.q_proj.weight"
    # output layers 1 and 2 read the same inputs (b1, x2, y3)
    for out_l in (1, 2):
        name = f"model.layers.{out_l}.{q}"
        spec = fastmerge_spec(raw, name)
        want = ref.merge(B[f"model.layers.1.{q}"], [X[f"model.layers.2.{q}"],
                                                    Y[f"model.layers.3.{q}"]],
                         spec.params, name=name, seed=spec.seed)
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(got[f"model.layers.1.{q}"], got[f"model.layers.2.{q}"])


def fastmerge_spec(raw, name):
    from fastmerge.pipeline.sliced import close_inputs, open_sliced
    inputs = open_sliced(parse_config(raw))
    try:
        return inputs.plan.spec_for(name)
    finally:
        close_inputs(inputs)


def test_torchrun_is_the_single_process_merge(ckpts, tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    from test_distributed import _torchrun
    cfg = write_yaml(tmp_path / "c.yml", config(ckpts, "model_stock"))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["merge", str(cfg), str(one), "--quiet"]) == 0
    r = _torchrun(["-m", "fastmerge", "merge", str(cfg), str(two), "--quiet"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    a, b = load_dir(one), load_dir(two)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- config errors
def _err(ckpts, tmp_path, capsys, raw, code=2):
    out = tmp_path / "o"
    assert main(["merge", str(write_yaml(tmp_path / "bad.yml", raw)), str(out)]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and not out.exists()
    return err


def test_errors_name_the_key(ckpts, tmp_path, capsys):
    b, x, y = ckpts["b"], ckpts["x"], ckpts["y"]
    base = {"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.5}}

    def sl(*slices, **top):
        return {**base, **top, "slices": [{"sources": list(s)} for s in slices]}
    err = _err(ckpts, tmp_path, capsys, sl([src(b, 0, 2), src(x, 4, 6)]))
    assert "slices[0].sources[1].layer_range: [4, 6) goes past the last layer" in err
    err = _err(ckpts, tmp_path, capsys, sl([src(b, 0, 2), src(x, 0, 3)]))
    assert "slices[0].sources[1].layer_range: [0, 3] holds 3 layers" in err
    err = _err(ckpts, tmp_path, capsys, sl([src(b, 0, 2), src(x, 0, 2)],
                                           parameters={"t": 1.5}))
    assert "parameters.t" in err and "1.5" in err
    err = _err(ckpts, tmp_path, capsys, sl([src(b, 0, 2), src(x, 0, 2)],
                                           parameters={"t": [0, 1.2]}))
    assert "parameters.t[1]" in err
    raw = sl([src(b, 0, 2), src(x, 0, 2)])
    raw["slices"][0]["parameters"] = {"t": -0.1}
    assert "slices[0].parameters.t" in _err(ckpts, tmp_path, capsys, raw)
    raw = sl([src(b, 0, 2), src(x, 0, 2)])
    del raw["base_model"]
    err = _err(ckpts, tmp_path, capsys, raw)
    assert "slices[0]: merge_method 'slerp' needs a base_model" in err
    err = _err(ckpts, tmp_path, capsys, sl([src(x, 0, 2), src(y, 0, 2)]))
    assert "slices[0].sources: the base model" in err and "must be one of" in err
    err = _err(ckpts, tmp_path, capsys, sl([src(b, 0, 2), src(x, 0, 2), src(y, 0, 2)]))
    assert "slices[0].sources: " in err and "at most 1" in err
    raw = sl([src(b, 0, 2), src(x, 0, 2)])
    raw["slices"][0]["sources"][1]["parameters"] = {"t": 0.5}
    err = _err(ckpts, tmp_path, capsys, raw)
    assert "slices[0].sources[1].parameters: unknown parameter 't'" in err
    raw = {"merge_method": "model_stock", "base_model": b,
           "slices": [{"sources": [src(b, 0, 2), src(x, 0, 2)]}]}
    err = _err(ckpts, tmp_path, capsys, raw)
    assert "slices[0].sources: " in err and "at least 2" in err
    raw = {"merge_method": "nuslerp", "slices": [{"sources": [src(x, 0, 2), src(y, 0, 2)]}]}
    err = _err(ckpts, tmp_path, capsys, raw)
    assert "weight" in err and "required" in err


def test_per_tensor_rules_are_checked_where_the_config_is_read(ckpts, tmp_path, capsys):
    """What mergekit's schemas check per tensor (a required parameter, della's density +-
    epsilon inside (0, 1)) and passthrough's scale fail as config errors naming the key (exit
    2, one line), not at plan time naming a tensor."""
    b, x, y = ckpts["b"], ckpts["x"], ckpts["y"]
    della = {"merge_method": "della", "base_model": b,
             "parameters": {"weight": 0.5, "density": 0.5},
             "slices": [{"sources": [src(b, 0, 2), src(x, 0, 2), src(y, 0, 2)]},
                        {"sources": [src(b, 2, 4), src(x, 2, 4),
                                     src(y, 2, 4, epsilon=[0.1, 0.6])]}]}
    della_density = {**della, "parameters": {"weight": 0.5, "density": 0.95}}
    slerp = {"merge_method": "slerp", "base_model": b,
             "slices": [{"sources": [src(b, 0, 2), src(x, 0, 2)], "parameters": {"t": 0.5}},
                        {"sources": [src(b, 2, 4), src(x, 2, 4)]}]}
    scale = {"merge_method": "passthrough",
             "slices": [{"sources": [src(x, 0, 2)]}, {"sources": [src(y, 1, 3, scale="abc")]}]}
    for raw, want in [
            (della, "slices[1].sources[2].parameters.epsilon: epsilon = 0.6 must keep density "
                    "+- epsilon inside (0, 1) for density 0.5"),
            (della_density, ": parameters.density: epsilon = 0.15 must keep"),
            (slerp, "slices[1].parameters.t: required by merge_method 'slerp'"),
            (scale, "slices[1].sources[0].parameters.scale: must be a number, got 'abc'")]:
        err = _err(ckpts, tmp_path, capsys, raw)
        assert want in err and "for tensor" not in err, err
    # a condition a tensor may fall through: the top-level value applies
    slerp["slices"][1]["parameters"] = {"t": [{"filter": "mlp", "value": 0.2}]}
    err = _err(ckpts, tmp_path, capsys, slerp)
    assert "slices[1].parameters.t: required" in err, err
    slerp["parameters"] = {"t": 0.4}
    parse_config(slerp)


def test_parse_errors():
    with pytest.raises(ConfigError, match=r"slices\[1\]: merge_method 'nearswap' needs a "
                                          r"base_model"):
        parse_config({"merge_method": "nearswap", "parameters": {"t": 0.1},
                      "slices": [{"sources": [src("a", 0, 1), src("b", 0, 1)],
                                  "base_model": "a"},
                                 {"sources": [src("a", 1, 2), src("b", 1, 2)]}]})


# ----------------------------------------------------------------------------- sweeps
@pytest.mark.parametrize("case,grid", [
    ("slerp", ["t=0.2,0.7", "slices[1].t=0.1,0.5"]),
    ("ties", ["density=0.3,0.8", "slices[0].sources[1].weight=0.2,0.9"]),
    ("passthrough", ["slices[0].sources[0].scale=1,2"]),
    ("slerp_models", ["t=0.2,0.7"]),
    # fastmerge's methods beside a mergekit one: a base read or not, each its own routes
    ("mixed", ["merge_method=task_arithmetic,linear,karcher"]),
])
def test_sweep_points_are_merges(ckpts, tmp_path, case, grid):
    from fastmerge.pipeline import native
    if native._core() is None:
        pytest.skip("fastmerge._core not built")
    b, x, y = ckpts["b"], ckpts["x"], ckpts["y"]
    if case == "slerp":
        raw = config(ckpts, "slerp")
    elif case == "ties":
        raw = {"merge_method": "ties", "base_model": b, "parameters": {"weight": 0.5},
               "slices": [{"sources": [src(b, 0, 3), src(x, 1, 4, density=0.5), src(y, 2, 5)]},
                          {"sources": [src(b, 2, 4), src(x, 0, 2), src(y, 3, 5)],
                           "parameters": {"density": 0.6}}]}
    elif case == "passthrough":
        raw = {"merge_method": "passthrough",
               "slices": [{"sources": [src(x, 0, 3)]}, {"sources": [src(y, 1, 3)]}]}
    elif case == "mixed":
        raw = {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
               "slices": [{"sources": [src(b, 0, 3), src(x, 1, 4), src(y, 2, 5)]},
                          {"sources": [src(b, 2, 4), src(x, 0, 2), src(y, 3, 5)]}]}
    else:   # a mergekit method over 'models:' sweeps too
        raw = {"merge_method": "slerp", "base_model": b, "models": [{"model": x}],
               "dtype": "float32", "parameters": {"t": 0.5}}
    cfg = write_yaml(tmp_path / "c.yml", raw)
    out = tmp_path / "sweep"
    argv = ["sweep", str(cfg), str(out), "--quiet"]
    for g in grid:
        argv += ["--grid", g]
    assert main(argv) == 0
    rows = yaml.safe_load((out / "sweep.json").read_text())
    rows = rows["points"] if isinstance(rows, dict) else rows
    n = 4 if case in ("slerp", "ties") else 3 if case == "mixed" else 2
    assert len(rows) == n
    # one read of the inputs where the points' routes are the same; a copied source (scale
    # 1) and a scaled one read differently, as do methods with a base and without
    passes = {"passthrough": [1, 2], "mixed": [1, 2, 3]}.get(case, [1] * n)
    assert sorted(r["pass"] for r in rows) == passes
    merge_each_point(tmp_path, rows)
    if case == "slerp":   # the points differ where their t differs
        a, b2 = (load_dir(Path(r["path"])) for r in rows[:2])
        assert not torch.equal(a["model.layers.4.mlp.up_proj.weight"],
                               b2["model.layers.4.mlp.up_proj.weight"])


def test_sweep_errors_name_the_point(ckpts, tmp_path, capsys, monkeypatch):
    """An error while a sliced point is re-planned (sliced.reroute) names the grid point, as
    one while it is resolved does; a bad value is a config error of its point."""
    import fastmerge.pipeline.sweep as sw
    cfg = write_yaml(tmp_path / "c.yml", {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(ckpts["x"], 0, 3)]}, {"sources": [src(ckpts["y"], 1, 3)]}]})
    argv = ["sweep", str(cfg), str(tmp_path / "out")]
    assert main(argv + ["--grid", "slices[1].sources[0].scale=abc,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastmerge: error: grid point slices[1].sources[0].scale=abc: " \
                  "slices[1].sources[0].parameters.scale: must be a number, got 'abc'", err

    def fail(inputs, cfg):
        raise ConfigError("slices[1]: re-planning failed")
    monkeypatch.setattr(sw, "reroute", fail)
    assert main(argv + ["--grid", "slices[1].sources[0].scale=3,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "grid point slices[1].sources[0].scale=3: slices[1]: re-planning failed" in err, err
    assert not (tmp_path / "out").exists()


def test_sweep_grid_keys_over_slices(ckpts):
    from fastmerge.recipe.grid import expand
    raw = config(ckpts, "slerp")
    pts = expand(raw, ["t=0.9", "slices[0].parameters.t=0.1"])   # applied in this order
    assert pts[0].raw["slices"][0]["parameters"]["t"] == 0.1
    assert pts[0].raw["slices"][1]["parameters"]["t"] == 0.9   # set where it was set
    assert pts[0].raw["parameters"]["t"] == 0.9
    for key, match in [("slices[0].sources[0].layer_range=[0,1]", "would change the inputs"),
                       ("slices[0].base_model=x", "would change the inputs"),
                       ("slices[5].t=0.1", "the config lists 2 slices"),
                       ("slices[0].sources[4].t=0.1", r"slices\[0\] lists 2 sources"),
                       ("lines.beta=1", "unknown grid key"),
                       ("slices[0].t=2", r"slices\[0\].parameters.t"),
                       ("slices[x].t=1", r"write slices\[I\].PARAM or "
                                         r"slices\[I\].sources\[J\].PARAM"),
                       ("slices[0].sources.t=1", r"write slices\[I\].PARAM"),
                       ("slices[0].sources[0].model=x", "would change the inputs"),
                       ("models[0].weight=1", "the config has no models:")]:
        with pytest.raises(ConfigError, match=match):
            expand(raw, [key])
    one = {**raw, "slices": raw["slices"][:1]}
    one["slices"][0] = {**one["slices"][0], "sources": one["slices"][0]["sources"][:1]}
    for key, match in [("slices[1].t=1", "the config lists 1 slice$"),
                       ("slices[0].sources[1].t=1", r"slices\[0\] lists 1 source$")]:
        with pytest.raises(ConfigError, match=match):
            expand(one, [key])
