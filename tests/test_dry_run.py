"""``fastmerge merge --dry-run``: the whole config resolved and every input checked from its
headers, the plan printed, no weight read and nothing written."""
from __future__ import annotations

import pytest
from engine_util import cli_merge_without_torch, write_yaml

from fastmerge.checkpoint.safetensors_file import SafetensorsFile
from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.pipeline import CheckpointError, ConfigError, native


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_synthetic_checkpoints(tmp_path_factory.mktemp("dry"), n_models=2, layers=2,
                                      hidden=32, inter=48, vocab=64, shards=2)


def _cfg(p, method="ties", **extra):
    return {"merge_method": method, "base_model": str(p["base"]),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
                       for m in p["models"]], **extra}


@pytest.fixture
def no_weight_reads(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("a dry run read a weight")
    for name in ("read", "view", "map", "_mapping", "_pread"):
        monkeypatch.setattr(SafetensorsFile, name, refuse)


def test_prints_the_plan_without_reading_or_writing(ckpts, tmp_path, no_weight_reads):
    text = native.dry_run(_cfg(ckpts, lines={"alpha": "auto", "beta": 1.0}), tmp_path / "out",
                          max_chunk_elems=1000)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    assert "dry run of ties (2 models" in text
    assert "LiNeS alpha=auto statistics" in text and "merge (without torch" in text
    assert "model.layers.1.mlp.up_proj.weight  [48, 32]  BF16->BF16  ties params #" in text
    assert "radix selection x1 (x2 on a missed guess)" in text   # 1536 elements, chunks of 1000
    assert "top-k window (radix on a miss)" in text
    assert " MB read" in text and "MiB needed" in text


def test_errors_come_as_they_would_in_the_merge(ckpts, tmp_path, no_weight_reads):
    with pytest.raises(ConfigError, match="lambda"):
        native.dry_run(_cfg(ckpts, parameters={"lambda": "x"}), tmp_path / "o")
    bad = _cfg(ckpts)
    bad["models"][1]["parameters"]["density"] = 2
    with pytest.raises(ValueError, match="density"):
        native.dry_run(bad, tmp_path / "o")
    with pytest.raises(CheckpointError, match="no such directory"):
        native.dry_run(_cfg(ckpts) | {"base_model": str(tmp_path / "nope")}, tmp_path / "o")


def test_cli_dry_run_does_not_import_torch(ckpts, tmp_path):
    yml = write_yaml(tmp_path / "m.yml", _cfg(ckpts, "dare_ties"))
    r = cli_merge_without_torch(yml, tmp_path / "out", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "dry run of dare_ties" in r.stdout and "statistics" in r.stdout
    assert not (tmp_path / "out").exists()


def _slices_cfg(p, method, slices, **extra):
    return {"merge_method": method, "base_model": str(p["base"]), "slices": slices, **extra}


def _src(model, lo, hi):
    return {"model": str(model), "layer_range": [lo, hi]}


def test_slices_count_distinct_models_and_show_each_tensors_sources(ckpts, tmp_path,
                                                                    no_weight_reads):
    """A frankenmerge of two models over 3 slices, one of them spelled twice, with a base for
    its config.json: 2 models and the base (no tensor read from it), not 4; each output
    tensor names the input tensor it is copied from."""
    b, x, y = ckpts["base"], *ckpts["models"]
    franken = _slices_cfg(ckpts, "passthrough", [{"sources": [_src(x, 0, 2)]},
                                                 {"sources": [_src(y, 1, 2)]},
                                                 {"sources": [_src(f"{x}/", 0, 1)]}])
    text = native.dry_run(franken, tmp_path / "out")
    assert f"dry run of passthrough over 3 slices (2 models, base {b}) -> " in text
    assert f"inputs: base = {b} (its config.json only: no tensor read); " \
           f"m0 = {x} (also written {x}/); m1 = {y}\n" in text
    assert "model.layers.2.mlp.up_proj.weight  [48, 32]  BF16->BF16  copied from " \
           "m1:model.layers.1.mlp.up_proj.weight\n" in text
    assert "model.layers.3.mlp.up_proj.weight  [48, 32]  BF16->BF16  copied from " \
           "m0:model.layers.0.mlp.up_proj.weight\n" in text
    assert "tensors: 0 merged, 39 copied" in text and not (tmp_path / "out").exists()


def test_slices_with_the_base_as_a_source(ckpts, tmp_path, no_weight_reads):
    """slerp over slices reading the base and one model: 1 model and the base, as a
    'models:' slerp says; the merged tensor lists both sources, base first."""
    b, x = ckpts["base"], ckpts["models"][0]
    cfg = _slices_cfg(ckpts, "slerp", [{"sources": [_src(b, 0, 2), _src(x, 0, 2)]},
                                       {"sources": [_src(b, 1, 2), _src(x, 0, 1)]}],
                      parameters={"t": 0.5})
    text = native.dry_run(cfg, tmp_path / "out")
    assert f"dry run of slerp over 2 slices (1 model, base {b}) -> " in text
    assert f"inputs: base = {b}; m0 = {x}\n" in text
    assert "model.layers.2.mlp.up_proj.weight  [48, 32]  BF16->BF16  slerp params #0  <- " \
           "base:model.layers.1.mlp.up_proj.weight, m0:model.layers.0.mlp.up_proj.weight\n" \
        in text
    one = _cfg(ckpts, "slerp", parameters={"t": 0.5})
    one["models"] = one["models"][:1]
    for m in one["models"]:
        m.pop("parameters")
    assert "dry run of slerp (1 model, base" in native.dry_run(one, tmp_path / "out")


def test_cli_dry_run_of_slices_does_not_import_torch(ckpts, tmp_path):
    x, y = ckpts["models"]
    yml = write_yaml(tmp_path / "s.yml", _slices_cfg(
        ckpts, "passthrough", [{"sources": [_src(x, 0, 1)]}, {"sources": [_src(y, 1, 2)]}]))
    r = cli_merge_without_torch(yml, tmp_path / "out", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "over 2 slices (2 models, base" in r.stdout and "copied from m1:" in r.stdout


def test_a_tensor_of_two_chunks_read_whole_is_shown_as_the_merge_reads_it(ckpts, tmp_path,
                                                                          no_weight_reads):
    """At 1000 elements a chunk the MLP matrices (1536 elements, 2 chunks) are read whole for
    the one-pass top-k in the merge (driver.read_whole_for_topk), the embeddings (2048, 3
    chunks) take the one-read radix selection."""
    text = native.dry_run(_cfg(ckpts), tmp_path / "out", max_chunk_elems=1000)
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  model.")}
    assert "top-k window" in lines["model.layers.1.mlp.up_proj.weight"]
    assert "radix selection x1" in lines["model.embed_tokens.weight"]
