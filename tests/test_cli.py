"""`fastmerge merge` on mergekit's own example configs (paths replaced), exit codes, demo."""
from __future__ import annotations

import pytest
from engine_util import index_of, load_dir
from helpers import TIES_YML

from fastmerge.cli import main
from fastmerge.cli.demo import make_synthetic_checkpoints

# mergekit's examples/bio-merge.yml and linear.yml (ties.yml: helpers.TIES_YML), model paths
# replaced
BIO_YML = """\
models:
  - model: {m0}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {m1}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: false
  int8_mask: true
dtype: float16
"""
LINEAR_YML = """\
models:
  - model: {m0}
    parameters:
      weight: 1.0
  - model: {m1}
    parameters:
      weight: 0.3
  - model: {m2}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_synthetic_checkpoints(tmp_path_factory.mktemp("cli"), n_models=3, layers=3,
                                      hidden=32, inter=48, vocab=64, shards=2,
                                      only=("q_proj", "up_proj"))


def _fmt(text, c):
    return text.format(base=c["base"], m0=c["models"][0], m1=c["models"][1], m2=c["models"][2])


@pytest.mark.parametrize("example", ["ties", "bio-merge", "linear"])
def test_mergekit_examples_run_unchanged(ckpts, tmp_path, capsys, example):
    text = {"ties": TIES_YML, "bio-merge": BIO_YML, "linear": LINEAR_YML}[example]
    cfg = tmp_path / f"{example}.yml"
    cfg.write_text(_fmt(text, ckpts))
    out = tmp_path / "out"
    rc = main(["merge", str(cfg), str(out), "--backend", "torch", "--shard-size", "20KB",
               "--memory-budget", "256MiB", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "merged" in captured.out and "peak RSS" in captured.out
    got = load_dir(out)
    assert all(t.dtype.is_floating_point and str(t.dtype) == "torch.float16"
               for t in got.values())
    assert len(index_of(out)["weight_map"]) == len(got)
    assert (out / "config.json").exists() and (out / "README.md").exists()


def test_errors_exit_1_with_a_message(ckpts, tmp_path, capsys):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(_fmt(BIO_YML, ckpts).replace("merge_method: ties", "merge_method: slerp"))
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "slerp" in err and "supported" in err
    assert main(["merge", str(tmp_path / "none.yml"), str(tmp_path / "o"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_progress_bar_and_overwrite(ckpts, tmp_path, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text(_fmt(BIO_YML, ckpts))
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--backend", "torch"]) == 0
    cap = capsys.readouterr()
    assert "merging" in cap.err and "tensors" in cap.err     # tqdm on stderr
    assert main(["merge", str(cfg), str(out), "--backend", "torch", "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(cfg), str(out), "--backend", "torch", "--quiet",
                 "--overwrite", "--seed", "3"]) == 0


def test_engine_demo_runs(capsys):
    from fastmerge.cli.demo import run_engine_demo
    res = run_engine_demo(backend="torch")
    out = capsys.readouterr().out
    assert "fastmerge: ties merged" in out and res.shards > 1


def test_mergekit_yaml_subcommand_reaches_mergekit(capsys):
    pytest.importorskip("mergekit")
    from fastmerge.cli import main
    assert main(["mergekit-yaml", "--help"]) == 0
    assert "CONFIG_FILE" in capsys.readouterr().out
