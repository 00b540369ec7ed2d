"""Config mistakes are one ConfigError line naming the key path or the file, found where the
config is read (before any checkpoint is opened)."""
from __future__ import annotations

import pytest

from fastmerge.methods import ALIASES, METHODS
from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
from fastmerge.recipe.config import ConfigError, load_config, parse_config, supported_methods


def full(**over) -> dict:
    raw = {"merge_method": "ties", "base_model": "/b",
           "models": [{"model": "/m0"}, {"model": "/m1"}]}
    raw.update(over)
    return raw


def m1(**params) -> list:
    return [{"model": "/m0"}, {"model": "/m1", "parameters": params}]


@pytest.mark.parametrize("raw,match", [
    (full(models=m1(weight=[])), r"^models\[1\]\.parameters\.weight: an empty list"),
    (full(models=m1(density=[0.1, "a"])),
     r"^models\[1\]\.parameters\.density\[1\]: must be a number, got 'a'"),
    (full(parameters={"lambda": [1.0, None]}), r"^parameters\.lambda\[1\]: no value"),
    (full(models=m1(weight=[{"filter": "mlp"}])),
     r"^models\[1\]\.parameters\.weight\[0\]: .*\{filter, value\} conditions"),
    (full(models=m1(weight=[{"filter": 3, "value": 1}])),
     r"^models\[1\]\.parameters\.weight\[0\]\.filter: must be a string"),
    (full(models=m1(weight=[{"filter": "mlp", "value": []}])),
     r"^models\[1\]\.parameters\.weight\[0\]\.value: an empty list"),
    (full(models=m1(weight=[{"filter": "mlp", "value": "x"}])),
     r"^models\[1\]\.parameters\.weight\[0\]\.value: must be a number"),
    (full(models=m1(weight=None)), r"^models\[1\]\.parameters\.weight: no value"),
    (full(models=m1(density=float("nan"))), r"density: must be finite, got nan"),
    (full(parameters={"lambda": float("inf")}), r"^parameters\.lambda: must be finite"),
    (full(models=m1(weight=True)), r"weight: must be a number, got True"),
    (full(parameters={"lambda": [0.5, False]}), r"lambda\[1\]: must be a number"),
    (full(parameters={"seed": 1.5}), r"^parameters\.seed: must be a whole number"),
    (full(parameters={"normalize": "yes"}), r"^parameters\.normalize: must be one of"),
    (full(parameters={"rescale": "l2"}), r"^parameters\.rescale: must be one of"),
    (full(parameters={"int8_mask": 3}), r"^parameters\.int8_mask: must be one of"),
    (full(parameters={"weight": {"a": 1}}), r"^parameters\.weight\[0\]: .*conditions"),
    (full(models=[]), r"^models: an empty list"),
    (full(models="/m0"), r"^models: must be a list of models, got a str"),
    (full(models={"model": "/m0"}), r"^models: must be a list of models, got a dict"),
    (full(models=["/m0", 3]), r"^models\[1\]: must be a path or a mapping"),
    (full(parameters=[1]), r"^parameters: must be a mapping"),
    (full(models=[{"model": "/m0", "parameters": 3}]), r"^models\[0\]\.parameters: must be"),
    (full(dtype=["bf16"]), r"^dtype: unsupported dtype"),
    (full(frobnicate=1), r"^unknown config key 'frobnicate'"),
    ({"merge_method": "ties", "base_model": "/b"}, r"needs a 'models' list"),
])
def test_malformed_values_name_the_key_path(raw, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_config(raw)
    assert "\n" not in str(info.value)


def test_good_values_still_parse():
    cfg = parse_config(full(
        models=m1(weight=[0, 0.5, 1], density=[{"filter": "mlp", "value": 0.5}, {"value": 1}]),
        parameters={"normalize": "count", "rescale": None, "seed": 3.0, "int8_mask": True,
                    "lambda": 0.9}))
    assert cfg.models[1].parameters["weight"] == [0, 0.5, 1]


@pytest.mark.parametrize("method", ["ranked_ties", "task_adapter", "frob", "tie"])
def test_unsupported_method_lists_the_registry(method):
    with pytest.raises(ConfigError, match=method) as info:
        parse_config(full(merge_method=method))
    assert str(info.value).endswith("supported: " + supported_methods())
    assert supported_methods() == ", ".join(sorted(list(METHODS) + list(ALIASES) +
                                                   list(MERGEKIT_METHODS)))


def test_a_method_that_lands_in_the_registry_is_accepted(monkeypatch):
    """The list of mergekit's names only words the error; the registry decides."""
    monkeypatch.setitem(METHODS, "ranked_ties", METHODS["ties"])
    assert parse_config(full(merge_method="ranked_ties")).method == "ranked_ties"
    assert "ranked_ties" in supported_methods()


@pytest.mark.parametrize("content,match", [
    (b"", "got an empty file"),
    (b"- a\n- b\n", "got a list"),
    (b"42\n", "got a int"),
    (b"just text\n", "got a str"),
    (b"\xff\xfe\x00\x01garbage", "is not UTF-8"),
    (b"!!python/object/apply:os.system ['true']\n", "not valid YAML: could not determine"),
    (b"merge_method: [\n", "not valid YAML"),
    (b"[" * 100_000, "nested too deeply"),
    (b"merge_method: ties\nmodels: []\n", "models: an empty list"),
])
def test_config_file_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "cfg.yml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_or_directory_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
