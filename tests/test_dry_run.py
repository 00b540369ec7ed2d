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
    assert "radix selection x2" in text            # 1536 elements in chunks of 1000
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
