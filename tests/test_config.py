"""Reading mergekit-style configs: keys, value syntax, mergekit defaults, clear errors."""
from __future__ import annotations

import pytest
from helpers import TIES_YML

from fastmerge.recipe.config import ConfigError, ParameterResolver, evaluate_setting, parse_config

NAMES = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + \
    ["model.embed_tokens.weight", "lm_head.weight"]


def cfg(method="ties", models=None, **kw):
    raw = {"merge_method": method, "base_model": "/b",
           "models": models or [{"model": "/m0"}, {"model": "/m1"}]}
    raw.update(kw)
    return parse_config(raw)


def test_gradient_interpolates_piecewise_linearly():
    assert evaluate_setting("x", [0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert evaluate_setting("x", [0.0, 0.3, 1.0], 0.75) == pytest.approx(0.65)
    assert evaluate_setting("x", [1, 0.7, 0.1], 1.0) == pytest.approx(0.1)
    assert evaluate_setting("x", 0.5, 0.9) == 0.5
    assert evaluate_setting("x", [True, False], 0.4) is True


def test_conditions_first_substring_match_wins():
    s = [{"filter": "mlp", "value": 0.5}, {"filter": "*", "value": 0.1}]
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", s, 0) == 0.5
    assert evaluate_setting("lm_head.weight", s, 0) == 0.1
    assert evaluate_setting("lm_head.weight", [{"filter": "mlp", "value": 1}], 0) is None
    assert evaluate_setting("a.mlp", [{"filter": "mlp", "value": [0, 1]}], 0.5) == 0.5


def test_block_depth_and_outside_tensors():
    c = cfg(models=[{"model": "/m0", "parameters": {"density": [1.0, 0.0]}}, {"model": "/m1"}])
    r = ParameterResolver(c, NAMES)
    assert r.num_blocks == 5
    assert r.t_of("model.layers.4.mlp.up_proj.weight") == 1.0
    assert r.t_of("model.embed_tokens.weight") == 0.0
    assert r.spec_for("model.layers.1.mlp.up_proj.weight").densities == (0.75, 1.0)
    assert r.spec_for("lm_head.weight").densities == (1.0, 1.0)


def test_mergekit_defaults_per_method():
    def spec(method, **kw):
        return ParameterResolver(cfg(method, **kw), NAMES).spec_for(NAMES[0])
    assert spec("ties").normalize is True and spec("ties").rescale is None
    assert spec("dare_ties").normalize is False and spec("dare_ties").rescale == "l1"
    assert spec("dare_linear").rescale == "l1"
    assert spec("breadcrumbs_ties").normalize is False
    assert spec("breadcrumbs").gammas == (0.01, 0.01)
    assert spec("task_arithmetic").normalize is False
    assert spec("linear").normalize is True
    assert spec("ties").densities == (1.0, 1.0) and spec("ties").lambda_ == 1.0
    # mergekit's rescale: true is our l1; our own defaults on request
    assert spec("ties", parameters={"rescale": True}).rescale == "l1"
    assert spec("dare_ties", defaults="fastmerge").rescale == "inverse_density"
    assert spec("dare_ties", defaults="fastmerge").normalize is True
    # methods mergekit lacks use fastmerge's table
    assert spec("ffg", models=[{"model": "/m", "preconditioner_path": "/v"}]).densities == (0.1,)


def test_base_listed_among_models_is_the_base():
    c = cfg(models=[{"model": "/b"}, {"model": "/m0"}, {"model": "/m1"}])
    assert [m.ref for m in c.models] == ["/m0", "/m1"]
    lin = cfg("linear", models=[{"model": "/b"}, {"model": "/m0"}])
    assert [m.ref for m in lin.models] == ["/b", "/m0"]


def test_accepted_mergekit_keys():
    c = cfg(dtype="float16", out_dtype="bfloat16", tokenizer_source="base",
            parameters={"int8_mask": True, "normalize": False, "lambda": 0.9})
    assert c.output_dtype == "bfloat16" and c.dtype == "float16"  # names: no torch needed
    s = ParameterResolver(c, NAMES).spec_for(NAMES[0])
    assert s.normalize is False and s.lambda_ == 0.9


@pytest.mark.parametrize("raw,match", [
    ({"merge_method": "ranked_ties"},
     "ranked_ties.*mergekit method fastmerge does not implement.*ties"),
    ({"merge_method": "slerp", "parameters": {"t": 2}}, r"parameters\.t: t must be <= 1"),
    ({"merge_method": "task_adapter"}, "task_adapter"),
    ({"merge_method": "frob"}, "unknown merge_method 'frob'; supported: .*breadcrumbs"),
    ({"slices": []}, "either .models. or .slices., not both"),
    ({"frobnicate": 1}, "unknown config key 'frobnicate'; supported keys: merge_method"),
    ({"parameters": {"densty": 0.5}}, "unknown parameter 'densty'; supported: .*density"),
    ({"models": [{"model": "/m", "parameters": {"normalize": True}}]}, "shared by all models"),
    ({"models": [{"model": "/m", "parameters": {"weight": [{"filt": "x"}]}}]}, "conditions"),
    ({"dtype": "int8"}, "unsupported dtype"),
    ({"tokenizer_source": ["union"]}, "tokenizer_source: must be"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"scope": "layer"}, "scope"),
    ({"lines": {"alpha": 1.0}}, "needs 'beta'"),
    ({"lines": {"alpha": 1.0, "beta": 0.5, "pattern": "layers"}}, "capture group"),
    ({"base_model": None}, "needs a base_model"),
])
def test_clear_errors(raw, match):
    full = {"merge_method": "ties", "base_model": "/b", "models": [{"model": "/m"}]}
    full.update(raw)
    with pytest.raises(ConfigError, match=match):
        parse_config(full)


def test_bad_values_name_the_tensor():
    c = cfg(models=[{"model": "/m0", "parameters": {"density": [{"filter": "lm_head",
                                                                 "value": 1.5}]}}])
    r = ParameterResolver(c, NAMES)
    r.spec_for(NAMES[0])
    with pytest.raises(ConfigError, match="tensor 'lm_head.weight'.*density"):
        r.spec_for("lm_head.weight")


def test_mergekit_example_configs_parse_unchanged():
    import yaml
    ties = yaml.safe_load(TIES_YML.format(
        m0="psmathur/orca_mini_v3_13b", m1="garage-bAInd/Platypus2-13B",
        m2="WizardLM/WizardMath-13B-V1.0", base="TheBloke/Llama-2-13B-fp16"))
    c = parse_config(ties)
    s = ParameterResolver(c, NAMES).spec_for("model.layers.2.mlp.up_proj.weight")
    assert s.densities == pytest.approx((0.7, 0.5, 0.33))
    assert s.weights == pytest.approx((1.0, 0.5, 0.5))
