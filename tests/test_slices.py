"""``slices:`` (frankenmerges): the job planner (recipe/slices.py) on synthetic names, end to
end ``fastmerge merge`` against mergekit 0.1.5 on tiny Llama checkpoints, the output
config.json, and the config errors (one line naming the key)."""
import json
import os

import pytest
import torch
from engine_util import load_dir, write_yaml
from safetensors.torch import save_file

from fastmerge.cli import main
from fastmerge.recipe.config import ConfigError, parse_config
from fastmerge.recipe.slices import ModelLayout, plan_slices

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYER = ("input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
         "mlp.up_proj.weight", "post_attention_layernorm.weight", "self_attn.k_proj.weight",
         "self_attn.o_proj.weight", "self_attn.q_proj.weight", "self_attn.v_proj.weight")
H, INTER, V, HEADS, KV = 16, 32, 32, 2, 1


def llama_names(n):
    return ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"] + \
        [f"model.layers.{i}.{s}" for i in range(n) for s in LAYER]


def layouts(**counts):
    return {m: ModelLayout(llama_names(n), {"model_type": "llama", "num_hidden_layers": n})
            for m, n in counts.items()}


def sliced(method, slices, **top):
    return parse_config({"merge_method": method, "slices": slices, **top})


def src(model, a, b, **params):
    d = {"model": model, "layer_range": [a, b]}
    if params:
        d["parameters"] = params
    return d


# ----------------------------------------------------------------------------- the planner
def test_passthrough_renumbers_repeats_and_interleaves():
    cfg = sliced("passthrough", [{"sources": [src("a", 0, 3)]}, {"sources": [src("b", 1, 3)]},
                                 {"sources": [src("a", 2, 4)]}])
    plan = plan_slices(cfg, layouts(a=4, b=4))
    assert plan.num_layers == 7 and plan.config_updates == {"num_hidden_layers": 7}
    by = {j.name: j for j in plan.jobs}
    assert all(j.copy for j in plan.jobs)
    # output layer -> (model, input layer): a0 a1 a2 b1 b2 a2 a3 (a2 twice)
    want = [("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("a", 2), ("a", 3)]
    for out, (m, i) in enumerate(want):
        for s in LAYER:
            assert by[f"model.layers.{out}.{s}"].models == [(m, f"model.layers.{i}.{s}")]
    assert by["model.embed_tokens.weight"].models == [("a", "model.embed_tokens.weight")]
    assert by["model.norm.weight"].models == [("a", "model.norm.weight")]   # the last slice
    assert by["lm_head.weight"].models == [("a", "lm_head.weight")]
    names = [j.name for j in plan.jobs]
    assert names[0] == "model.embed_tokens.weight" and len(names) == 3 + 7 * len(LAYER)
    assert plan.config_model == "a"


def test_non_layer_tensors_come_from_first_and_last_slices():
    cfg = sliced("passthrough", [{"sources": [src("a", 0, 2)]}, {"sources": [src("b", 0, 2)]}])
    by = {j.name: j for j in plan_slices(cfg, layouts(a=2, b=2)).jobs}
    assert by["model.embed_tokens.weight"].models[0][0] == "a"
    assert by["model.norm.weight"].models[0][0] == "b"
    assert by["lm_head.weight"].models[0][0] == "b"


def test_ties_over_slices_gradients_per_slice_and_precedence():
    cfg = sliced("ties", [
        {"sources": [src("b", 0, 3), src("x", 0, 3, density=[0.2, 1.0]), src("y", 2, 5)],
         "parameters": {"weight": [1.0, 3.0]}},
        {"sources": [src("b", 3, 4), src("x", 4, 5, weight={"filter": "mlp", "value": 7.0}),
                     src("y", 0, 1)], "base_model": "b"},
    ], base_model="b", parameters={"density": 0.5, "weight": 0.25, "lambda": [1.0, 2.0]})
    plan = plan_slices(cfg, layouts(b=4, x=5, y=5))
    by = {j.name: j for j in plan.jobs}
    q = "self_attn.q_proj.weight"
    # slice 0, layer k: t = k / 2; the base is the source named base_model, in its own range
    for k, t in enumerate((0.0, 0.5, 1.0)):
        j = by[f"model.layers.{k}.{q}"]
        assert j.t == t and j.base == ("b", f"model.layers.{k}.{q}")
        assert j.models == [("x", f"model.layers.{k}.{q}"), ("y", f"model.layers.{2 + k}.{q}")]
        spec = plan.spec_for(j.name)
        assert spec.densities == pytest.approx((0.2 + 0.8 * t, 0.5))    # source > global
        assert spec.weights == pytest.approx((1 + 2 * t,) * 2)          # slice > global
        assert spec.lambda_ == pytest.approx(1 + t)                     # shared: global
    # slice 1 (one layer: t = 1), a filter on the input name
    j = by[f"model.layers.3.{q}"]
    assert j.t == 1.0 and j.models == [("x", f"model.layers.4.{q}"), ("y", f"model.layers.0.{q}")]
    assert plan.spec_for(j.name).weights == pytest.approx((0.25, 0.25))
    assert plan.spec_for("model.layers.3.mlp.up_proj.weight").weights == \
        pytest.approx((7.0, 0.25))
    # outside the layers: t = 0, the first slice's parameters
    emb = plan.spec_for("model.embed_tokens.weight")
    assert emb.weights == pytest.approx((1.0, 1.0)) and emb.lambda_ == 1.0
    assert plan.num_layers == 4


def test_against_mergekit_planner_names():
    """The (output, inputs) pairs of mergekit's own planner for a three-slice frankenmerge."""
    pytest.importorskip("mergekit")
    from mergekit.architecture import arch_info_for_config
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from transformers import LlamaConfig

    slices = [{"sources": [src("a", 0, 2)]}, {"sources": [src("b", 1, 3)]},
              {"sources": [src("a", 1, 2)]}]
    raw = {"merge_method": "passthrough", "slices": slices}
    llama = LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=4,
                        num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
                        architectures=["LlamaForCausalLM"])

    class NoIO(MergePlanner):   # the models' configs given; lm_head taken as present
        def _model_arch(self, model):
            return _configured(self, llama)

        def plan_tensor(self, weight, *args, **kwargs):
            super().plan_tensor(weight.model_copy(update={"optional": False}), *args, **kwargs)
    mk = MergeConfiguration.model_validate(raw)
    planner = NoIO(mk, arch_info_for_config(llama), MergeOptions(), llama)
    planner._tokenizer_task = None
    planner.normalize_config()
    for name in planner.config.modules:
        planner.plan_module(name, planner.config.modules[name])
    theirs = {}
    for w, task in planner._tensors:
        gathered = task.gather_tensors.weight_info
        theirs[w.name] = [(m.model.path, wi.name) for m, wi in gathered.items()]
    ours = {j.name: j.models for j in plan_slices(parse_config(raw), layouts(a=4, b=4)).jobs}
    assert ours == theirs


def _configured(planner, cfg):
    from mergekit.architecture.base import ConfiguredModelArchitecture
    return ConfiguredModelArchitecture(info=planner.arch_info, config=cfg)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Three tiny float32 Llama checkpoints of 4 layers: b (base), x, y (b + noise)."""
    root = tmp_path_factory.mktemp("llamas")
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H),
              "model.norm.weight": (H,)}
    for s in LAYER:
        shapes.update({f"model.layers.{i}.{s}": _layer_shape(s) for i in range(4)})
    base = {k: torch.randn(v, generator=g) * 0.1 for k, v in shapes.items()}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
              "intermediate_size": INTER, "num_hidden_layers": 4, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "vocab_size": V, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
              "hidden_act": "silu"}
    paths = {}
    for name in ("b", "x", "y"):
        sd = {k: (v if name == "b" else v + 0.02 * torch.randn(v.shape, generator=g))
              for k, v in base.items()}
        d = root / name
        d.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config))
        (d / "tokenizer_config.json").write_text(json.dumps({"from": name}))
        paths[name] = d
    return paths


def _layer_shape(s):
    return {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
            "mlp.down_proj.weight": (H, INTER), "mlp.gate_proj.weight": (INTER, H),
            "mlp.up_proj.weight": (INTER, H), "self_attn.k_proj.weight": (KV * H // HEADS, H),
            "self_attn.v_proj.weight": (KV * H // HEADS, H),
            "self_attn.q_proj.weight": (H, H), "self_attn.o_proj.weight": (H, H)}[s]


def _mergekit(raw, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    run_merge(MergeConfiguration.model_validate(raw), str(out),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
    return load_dir(out)


def _fastmerge(tmp_path, raw, name="fm"):
    out = tmp_path / name
    assert main(["merge", str(write_yaml(tmp_path / f"{name}.yml", raw)), str(out),
                 "--quiet"]) == 0
    return out


def test_passthrough_frankenmerge_matches_mergekit(llamas, tmp_path):
    pytest.importorskip("mergekit")
    p = {k: str(v) for k, v in llamas.items()}
    raw = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [src(p["x"], 0, 3)]}, {"sources": [src(p["y"], 1, 4)]},
                      {"sources": [src(p["x"], 2, 4)]}]}
    out = _fastmerge(tmp_path, raw)
    ours, theirs = load_dir(out), _mergekit(raw, tmp_path / "mk")
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    x = load_dir(llamas["x"])   # copies, byte for byte: output layer 6 is x's layer 2 again
    assert torch.equal(ours["model.layers.6.mlp.up_proj.weight"],
                       x["model.layers.2.mlp.up_proj.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 8 and len(model.model.layers) == 8
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_sliced_merge_matches_mergekit(llamas, tmp_path, method, monkeypatch):
    pytest.importorskip("mergekit")
    p = {k: str(v) for k, v in llamas.items()}
    s0 = [src(p["b"], 0, 2), src(p["x"], 1, 3, weight=[0.3, 0.9], density=0.6),
          src(p["y"], 2, 4, weight=0.5, density=[1.0, 0.4])]
    s1 = [src(p["b"], 3, 4), src(p["x"], 0, 1), src(p["y"], 3, 4)]
    raw = {"merge_method": method, "dtype": "float32",
           "slices": [{"sources": s0}, {"sources": s1, "parameters": {"weight": 0.7}}],
           "parameters": {"density": 0.8}}
    if method == "ties":
        raw["base_model"] = p["b"]
    else:
        for s in s0 + s1:
            s.get("parameters", {}).pop("density", None)
        raw["parameters"] = {"weight": 1.0}   # mergekit's linear has no default weight
    out = _fastmerge(tmp_path, raw)
    ours, theirs = load_dir(out), _mergekit(raw, tmp_path / "mk")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    # the torch kernels read the same routes: byte for byte the same output
    monkeypatch.setenv("FASTMERGE_NATIVE", "0")
    engine = load_dir(_fastmerge(tmp_path, raw, "engine"))
    assert all(torch.equal(engine[k], ours[k]) for k in ours)


def test_tokenizer_source_model_and_base(llamas, tmp_path):
    p = {k: str(v) for k, v in llamas.items()}
    raw = {"merge_method": "passthrough", "tokenizer_source": f"model:{p['y']}",
           "slices": [{"sources": [src(p["x"], 0, 2)]}, {"sources": [src(p["y"], 3, 4)]}]}
    out = _fastmerge(tmp_path, raw)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "y"}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    raw = {"merge_method": "ties", "base_model": p["b"], "tokenizer": {"source": "base"},
           "models": [{"model": p["x"]}, {"model": p["y"]}]}
    out = _fastmerge(tmp_path, raw, "fm2")
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "b"}


def test_passthrough_with_another_out_dtype_rounds(llamas, tmp_path):
    p = {k: str(v) for k, v in llamas.items()}
    raw = {"merge_method": "passthrough", "out_dtype": "bfloat16",
           "slices": [{"sources": [src(p["x"], 1, 2, scale=2.0)]},
                      {"sources": [src(p["y"], 0, 1)]}]}
    got = load_dir(_fastmerge(tmp_path, raw))
    x, y = load_dir(llamas["x"]), load_dir(llamas["y"])
    q = "self_attn.q_proj.weight"
    assert got[f"model.layers.0.{q}"].dtype == torch.bfloat16
    assert torch.equal(got[f"model.layers.0.{q}"], (2 * x[f"model.layers.1.{q}"]).bfloat16())
    assert torch.equal(got[f"model.layers.1.{q}"], y[f"model.layers.0.{q}"].bfloat16())


def test_range_past_the_model_and_unknown_model(llamas, tmp_path, capsys):
    p = {k: str(v) for k, v in llamas.items()}
    raw = {"merge_method": "passthrough",
           "slices": [{"sources": [src(p["x"], 0, 2)]}, {"sources": [src(p["y"], 0, 40)]}]}
    assert main(["merge", str(write_yaml(tmp_path / "a.yml", raw)), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "slices[1].sources[0].layer_range: [0, 40) goes past the last layer" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
    raw["slices"][1]["sources"][0] = src(str(tmp_path / "nope"), 0, 1)
    assert main(["merge", str(write_yaml(tmp_path / "b.yml", raw)), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "slices[1].sources[0].model" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("raw,match", [
    ({"models": [{"model": "a"}], "slices": [{"sources": [src("a", 0, 1)]}]},
     "either 'models' or 'slices', not both"),
    ({"slices": [{"sources": [src("a", 3, 1)]}]}, r"slices\[0\].sources\[0\].layer_range: "
                                                   r"\[3, 1\) is reversed"),
    ({"slices": [{"sources": [src("a", 2, 2)]}]}, r"layer_range: \[2, 2\) is empty"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 1.5]}]}]},
     r"slices\[0\].sources\[0\].layer_range: layer indices must be whole numbers"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": "0-4"}]}]}, "two layer indices"),
    ({"slices": [{"sources": [{"model": "a"}]}]}, r"sources\[0\].layer_range: missing"),
    ({"slices": [{"sources": [src("a", 0, 1)]}, {"sources": [src("a", 0, 2), src("b", 0, 3)]}],
      "merge_method": "linear"},
     r"slices\[1\].sources\[1\].layer_range: \[0, 3\] holds 3 layers but"),
    ({"slices": [{"sources": [src("a", 0, 1), src("b", 0, 1)]}]},
     r"slices\[0\].sources: passthrough copies exactly one source"),
    ({"slices": [{"sources": [src("a", 0, 1), src("b", 0, 1)]}], "merge_method": "ties"},
     r"slices\[0\]: merge_method 'ties' needs a base_model"),
    ({"slices": [{"sources": [src("a", 0, 1), src("b", 0, 1)]}], "merge_method": "ties",
      "base_model": "c"}, r"slices\[0\].sources: the base model 'c' must be one of"),
    ({"slices": [{"sources": [src("a", 0, 1), src("a", 1, 2)]}], "merge_method": "linear"},
     r"slices\[0\].sources\[1\].model: 'a' is listed twice"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 1], "parameters": {"lambda": 1}}]}],
      "merge_method": "ties", "base_model": "a"},
     r"slices\[0\].sources\[0\].parameters: 'lambda' is shared by all models"),
    ({"slices": [{"sources": [src("a", 0, 1, density=0.5)]}]},
     r"slices\[0\].sources\[0\].parameters: unknown parameter 'density'; supported: scale"),
    ({"slices": [{"sources": [src("a", 0, 1)], "frob": 1}]}, r"slices\[0\]: unknown key 'frob'"),
    ({"slices": []}, "slices: must be a non-empty list"),
    ({"slices": [{"sources": [src("a", 0, 1)]}], "tokenizer_source": "union"},
     "tokenizer_source: 'union' .* not supported yet"),
    ({"slices": [{"sources": [src("a", 0, 1)]}], "tokenizer": {"source": "base",
                                                                "tokens": {"<x>": {}}}},
     "tokenizer.tokens: not supported yet"),
    ({"slices": [{"sources": [src("a", 0, 1)]}], "tokenizer": {}},
     "tokenizer.source: 'union'"),
    ({"slices": [{"sources": [src("a", 0, 1)]}], "lines": {"beta": 1}}, "lines: LiNeS"),
])
def test_config_errors(raw, match):
    full = {"merge_method": "passthrough", **raw}
    with pytest.raises(ConfigError, match=match):
        parse_config(full)


def test_range_errors_from_the_planner():
    cfg = sliced("linear", [{"sources": [src("a", 0, 2), src("b", 3, 5)]}])
    with pytest.raises(ConfigError, match=r"slices\[0\].sources\[1\].layer_range: \[3, 5\) goes "
                                          r"past the last layer of 'b', which has 4 layers"):
        plan_slices(cfg, layouts(a=4, b=4))


def test_gpt2_names_and_layer_key():
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"] + \
        [f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)]
    cfg = sliced("passthrough", [{"sources": [src("g", 1, 3)]}, {"sources": [src("g", 0, 1)]}])
    plan = plan_slices(cfg, {"g": ModelLayout(names, {"model_type": "gpt2", "n_layer": 3})})
    assert plan.config_updates == {"n_layer": 3}
    assert [(j.name, j.models[0][1]) for j in plan.jobs] == [
        ("transformer.wte.weight", "transformer.wte.weight"),
        ("transformer.wpe.weight", "transformer.wpe.weight"),
        ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"),
        ("transformer.h.1.attn.c_attn.weight", "transformer.h.2.attn.c_attn.weight"),
        ("transformer.h.2.attn.c_attn.weight", "transformer.h.0.attn.c_attn.weight"),
        ("transformer.ln_f.weight", "transformer.ln_f.weight")]
    # an unknown architecture: the block pattern and the first layer-count key found
    plan = plan_slices(cfg, {"g": ModelLayout(names, {"num_layers": 3})})
    assert plan.config_updates == {"num_layers": 3} and len(plan.jobs) == 6
