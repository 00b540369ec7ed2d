"""``fastmerge sweep``: every point byte for byte ``fastmerge merge`` of its parameters, each
input chunk loaded once per pass, the budget split into passes, evaluation (last number, JSON
field, failures recorded), keep-best, and one clear error per bad input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from engine_util import merge_each_point

import fastmerge
from fastmerge.cli import main
from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.pipeline import native
from fastmerge.pipeline.core_kernels import CoreKernels
from fastmerge.pipeline.sweep import sweep
from fastmerge.pipeline.sweep_eval import parse_score
from fastmerge.recipe.config import ConfigError

pytestmark = pytest.mark.skipif(native._core() is None, reason="fastmerge._core not built")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return make_synthetic_checkpoints(root, n_models=2, layers=2, hidden=32, inter=48,
                                      vocab=64, shards=1)


def _config(tmp_path, p, method, **extra) -> Path:
    cfg = {"merge_method": method, "base_model": str(p["base"]),
           "models": [{"model": str(m), "parameters": {"weight": w, "density": 0.5}}
                      for m, w in zip(p["models"], (0.6, 0.4))], **extra}
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("method,grid,extra", [
    ("ties", ["density=0.2,0.5,0.9", "lambda=1,0.7"], {}),
    ("dare_ties", ["density=0.3,0.6", "models[1].weight=0.2,0.9"], {}),
    ("task_arithmetic", ["lambda=0.5,1.5"], {}),
    ("breadcrumbs_ties", ["gamma=0.01,0.05", "density=0.5,0.8"], {}),
    ("ties", ["merge_method=ties,dare_ties,task_arithmetic,linear"], {}),
    ("ties", ["lines.beta=0.5,1.0"], {"lines": {"alpha": 0.5, "beta": 1.0}}),
])
def test_each_point_is_merge_byte_for_byte(ckpts, tmp_path, method, grid, extra):
    cfg = _config(tmp_path, ckpts, method, **extra)
    rows = sweep(cfg, tmp_path / "out", grid, max_chunk_elems=700)
    n = 1
    for g in grid:
        n *= len(g.split("=")[1].split(","))
    assert len(rows) == n and len({r["point"] for r in rows}) == n
    table = (tmp_path / "out" / "sweep.csv").read_text().splitlines()
    assert len(table) == n + 1
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())[0]["path"] == rows[0]["path"]
    merge_each_point(tmp_path, rows)


def test_each_chunk_is_loaded_once_per_pass(ckpts, tmp_path, monkeypatch):
    loads = []
    real = CoreKernels.load

    def counted(self, name, start, stop, only_reference=False):
        loads.append((name, start, stop))
        return real(self, name, start, stop, only_reference)
    monkeypatch.setattr(CoreKernels, "load", counted)
    cfg = _config(tmp_path, ckpts, "ties")
    rows = sweep(cfg, tmp_path / "out", ["density=0.2,0.4,0.6,0.8"])
    assert len(rows) == 4
    assert len(loads) == len(set(loads))          # every (tensor, range) once, for 4 points
    loads.clear()
    sweep(cfg, tmp_path / "out2", ["density=0.2,0.4,0.6,0.8"], points_per_pass=2)
    assert len(loads) == 2 * len(set(loads))      # two passes


def test_budget_too_small_splits_into_passes(ckpts, tmp_path, capsys):
    cfg = _config(tmp_path, ckpts, "task_arithmetic")
    from fastmerge.pipeline.budget import MIN_CHUNK_ELEMS, plan_chunking
    # bf16 base + 2 models: room for one point's buffers at the minimal chunk, not for more
    one = plan_chunking(2 ** 30, "cpu", 2, 3 * 2, 2, sparsifier="none")
    budget = one.fixed + MIN_CHUNK_ELEMS * (one.bytes_per_elem + 2)
    rows = sweep(cfg, tmp_path / "out", ["lambda=0.5,1,1.5"], memory_budget=budget,
                 quiet=False)
    assert len({r["pass"] for r in rows}) > 1
    assert "passes over the inputs" in capsys.readouterr().err
    merge_each_point(tmp_path, rows)
    with pytest.raises(ConfigError, match="points per pass"):
        sweep(cfg, tmp_path / "out2", ["lambda=0.5,1,1.5"], memory_budget=budget,
              points_per_pass=3)
    assert not (tmp_path / "out2").exists()


def test_parse_score():
    assert parse_score("loading...\nstep 3\nacc: 0.71\n") == 0.71
    assert parse_score("x 1e-3") == 1e-3
    assert parse_score('noise\n{"acc": 0.5, "f1": {"macro": 0.25}}\n', "f1.macro") == 0.25
    with pytest.raises(ValueError):
        parse_score("nothing here")
    with pytest.raises(ValueError):
        parse_score('{"acc": 0.5}', "loss")


def test_eval_keep_best_and_failures(ckpts, tmp_path):
    cfg = _config(tmp_path, ckpts, "task_arithmetic")
    # the score is lambda itself, read back from the point's config; lambda=1.5 fails
    script = tmp_path / "score.py"
    script.write_text(
        "import sys, yaml\n"
        "lam = yaml.safe_load(open(sys.argv[1] + '/fastmerge_config.yml'))['parameters']"
        "['lambda']\n"
        "if lam == 1.5: sys.exit('boom')\n"
        "print('evaluating', sys.argv[1]); print(f'score {lam}')\n")
    rows = sweep(cfg, tmp_path / "out", {"lambda": [0.5, 1.0, 1.5, 2.0]},
                 eval_command=f"{sys.executable} {script} {{model}}", keep_best=2)
    by = {r["lambda"]: r for r in rows}
    assert by[0.5]["score"] == 0.5 and by[2.0]["score"] == 2.0
    assert by[1.5]["score"] is None and by[1.5]["eval_status"].startswith("failed")
    assert [by[x]["weights"] for x in (0.5, 1.0, 1.5, 2.0)] == \
        ["deleted", "kept", "deleted", "kept"]
    for lam, r in by.items():
        d = Path(r["path"])
        assert (d / "fastmerge_config.yml").exists()
        assert bool(list(d.glob("*.safetensors"))) == (r["weights"] == "kept")
    table = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [t["score"] for t in table] == [0.5, 1.0, None, 2.0]


@pytest.mark.parametrize("grid,match", [
    ([], "grid is empty"),
    (["density"], "KEY=V1,V2"),
    (["foo=1,2"], "unknown parameter 'foo'"),
    (["density=0.5,1.7"], "density=1.7"),
    (["models[5].weight=1"], "lists 2 models"),
    (["models[x].weight=1"], "write models[I].PARAM"),
    (["models[0].model=x"], "would change the inputs"),
    (["models[0].preconditioner_path=x"], "would change the inputs"),
    (["models[0].parameters.model=x"], "unknown parameter 'model'"),
    (["slices[0].t=1"], "the config has no slices:"),
    (["base_model=x"], "would change the inputs"),
    (["merge_method=ties,nope"], "merge_method=nope"),
])
def test_bad_grid_is_one_line(ckpts, tmp_path, capsys, grid, match):
    cfg = _config(tmp_path, ckpts, "ties")
    args = ["sweep", str(cfg), str(tmp_path / "out")] + [x for g in grid for x in ("--grid", g)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fastmerge: error:")
    assert match in err, err
    assert not (tmp_path / "out").exists()


def test_one_point_and_existing_out_dir(ckpts, tmp_path, capsys):
    cfg = _config(tmp_path, ckpts, "ties")
    rows = fastmerge.sweep(cfg, tmp_path / "out", ["density=0.4"])
    assert len(rows) == 1
    merge_each_point(tmp_path, rows)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    capsys.readouterr()
    assert main(["sweep", str(cfg), str(tmp_path / "out"), "--grid", "density=0.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and err.count("\n") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_disk_too_small_is_refused_before_starting(ckpts, tmp_path, monkeypatch):
    import collections

    import fastmerge.pipeline.sweep as sw
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sw.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9, 1000))
    cfg = _config(tmp_path, ckpts, "ties")
    with pytest.raises(OSError, match="outputs need .* GB free"):
        sweep(cfg, tmp_path / "out", ["density=0.2,0.5"])
    assert not (tmp_path / "out").exists()


def test_shared_selection_reads_a_two_chunk_tensor_whole_as_the_merge(ckpts, tmp_path,
                                                                       monkeypatch):
    """At 1000 elements a chunk the MLP matrices (1536 elements) are two chunks: a merge
    selects on the whole tensor (the one-pass top-k, driver.read_whole_for_topk), and so does
    the sweep's selection shared by its densities; the radix only for the larger ones."""
    radix = []
    real = CoreKernels.radix

    def counted(self, source, requests, n_models, score, names, *a, **k):
        radix.append(names[0])
        return real(self, source, requests, n_models, score, names, *a, **k)
    monkeypatch.setattr(CoreKernels, "radix", counted)
    cfg = _config(tmp_path, ckpts, "ties")
    rows = sweep(cfg, tmp_path / "out", ["density=0.2,0.6"], max_chunk_elems=1000)
    assert not [x for x in radix if ".mlp." in x] and radix    # the embeddings: 3 chunks
    merge_each_point(tmp_path, rows)
