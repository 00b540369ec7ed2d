"""``fastmerge sweep`` under torchrun (2 processes, gloo, 127.0.0.1): every rank merges its
share of every point's tensors (giant ones split by rows, their shared selections all-reduced)
into one output directory, byte for byte the one-process sweep; a failing rank leaves
nothing. See docs/sweeps.md and docs/distributed.md."""
from __future__ import annotations

import json

import pytest
from engine_util import write_yaml
from test_distributed import SHARD, _torchrun, pytestmark  # noqa: F401 (gloo skip)

from fastmerge.cli import main
from fastmerge.cli.demo import make_synthetic_checkpoints

GRID = ["merge_method=ties,dare_ties", "density=0.3,0.6"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    # embeddings and LM head (16 KiB) are above test_distributed's FASTMERGE_SPLIT_BYTES:
    # split by rows over the ranks
    root = tmp_path_factory.mktemp("sweep_dist")
    p = make_synthetic_checkpoints(root, n_models=3, layers=2, hidden=64, inter=96,
                                   vocab=128, shards=2)
    return write_yaml(root / "c.yml", {
        "merge_method": "ties", "base_model": str(p["base"]),
        "models": [{"model": str(m), "parameters": {"weight": w, "density": 0.5}}
                   for m, w in zip(p["models"], (0.5, 0.3, 0.2))]})


@pytest.fixture(scope="module")
def sliced_cfg(tmp_path_factory):
    """mergekit's slerp over slices (a repeated, shifted layer range); the grid adds nearswap,
    both over the same routes."""
    root = tmp_path_factory.mktemp("sweep_dist_slices")
    p = make_synthetic_checkpoints(root, n_models=1, layers=2, hidden=64, inter=96,
                                   vocab=128, shards=2)
    b, x = str(p["base"]), str(p["models"][0])
    return write_yaml(root / "c.yml", {
        "merge_method": "slerp", "base_model": b, "dtype": "float32",
        "parameters": {"t": 0.5},
        "slices": [{"sources": [{"model": b, "layer_range": [0, 2]},
                                {"model": x, "layer_range": [0, 2]}]},
                   {"sources": [{"model": b, "layer_range": [1, 2]},
                                {"model": x, "layer_range": [0, 1]}]}]})


def _args(cfg, out, grid=GRID) -> list:
    return ["sweep", str(cfg), str(out), *[x for g in grid for x in ("--grid", g)],
            "--quiet", "--seed", "7", "--shard-size", SHARD]


@pytest.mark.parametrize("which", ["models", "slices"])
def test_torchrun_sweep_is_the_one_process_sweep(cfg, sliced_cfg, tmp_path, which):
    if which == "slices":
        cfg, grid = sliced_cfg, ["merge_method=slerp,nearswap", "t=0.3,0.6"]
    else:
        grid = GRID
    one = tmp_path / "one"
    assert main(_args(cfg, one, grid)) == 0
    two = tmp_path / "two"
    r = _torchrun(["-m", "fastmerge", *_args(cfg, two, grid)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((two / "sweep.json").read_text())
    assert len(rows) == 4 and r.stdout.count(str(two)) == 4     # rank 0 lists the points once
    points = sorted(p.name for p in one.iterdir() if p.is_dir())
    assert sorted(p.name for p in two.iterdir() if p.is_dir()) == points
    for name in points:
        files = sorted(f.name for f in (one / name).iterdir())
        assert sorted(f.name for f in (two / name).iterdir()) == files
        assert sum(f.endswith(".safetensors") for f in files) > 1
        for f in files:
            assert (two / name / f).read_bytes() == (one / name / f).read_bytes(), (name, f)


def test_a_failing_rank_fails_the_sweep_and_leaves_no_output(cfg, tmp_path):
    out = tmp_path / "out"
    r = _torchrun(["-m", "fastmerge", *_args(cfg, out)], FASTMERGE_TEST_FAIL_RANK="1:3")
    assert r.returncode != 0
    assert "fastmerge: error: rank 1 of 2: " in r.stderr and "injected failure" in r.stderr, \
        r.stderr[-3000:]
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if "fastmerge-tmp" in p.name]

