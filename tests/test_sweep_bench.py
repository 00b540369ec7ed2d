"""benchmarks/bench_sweep.py's arguments and plan, cheaply (nothing generated or merged): the
default grid per size (K = 3 at 7B), the layer count the free disk allows at 7B shapes with
8 GB spare, one-line refusals, and ``--dry-run``."""
from __future__ import annotations

import collections

import pytest
from bench_util import load_benchmark

GB = 10 ** 9


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_sweep.py", "fm_bench_sweep", on_path=True)


def test_default_grids(bench):
    a = bench.parse_args(["--size", "7b"])
    assert a.grid == bench.GRID_LARGE and bench.grid_points(a.grid) == 3
    assert a.layers is None and not a.dry_run and not a.no_loop
    b = bench.parse_args([])
    assert b.size == "0.2b" and bench.grid_points(b.grid) == 4
    c = bench.parse_args(["--grid", "lambda=0.5,1", "--layers", "3", "--no-loop"])
    assert c.grid == ["lambda=0.5,1"] and c.layers == 3 and c.no_loop
    with pytest.raises(SystemExit):
        bench.parse_args(["--layers", "0"])


def test_layers_fit_the_disk_at_7b(bench):
    mc = bench.mc
    per_layer = 2 * (mc.param_count("7b", 2) - mc.param_count("7b", 1))
    fixed = 2 * mc.param_count("7b", 1) - per_layer          # embeddings, LM head, norm
    free = 80 * GB
    n = bench.plan_layers("7b", None, 2, 3, free)
    assert 1 <= n < 32
    assert 6 * (fixed + n * per_layer) <= free - bench.SPARE < 6 * (fixed + (n + 1) * per_layer)
    assert bench.plan_layers("7b", None, 2, 3, 10 ** 4 * GB) == 32       # all of them
    assert bench.plan_layers("0.2b", None, 2, 4, 80 * GB) == 12           # small: its own
    assert bench.plan_layers("7b", 4, 2, 3, 80 * GB) == 4
    with pytest.raises(bench.mc.UserError, match="--layers"):
        bench.plan_layers("7b", 32, 2, 3, 80 * GB)
    with pytest.raises(bench.mc.UserError, match="not even one layer"):
        bench.plan_layers("7b", None, 2, 3, 9 * GB)
    # inputs already on disk count as room
    inputs = 3 * 2 * mc.param_count("7b", 4)
    assert bench.plan_layers("7b", 4, 2, 3, 15 * GB, have=inputs) == 4
    with pytest.raises(bench.mc.UserError):
        bench.plan_layers("7b", 4, 2, 3, 15 * GB)
    assert mc.layers_that_fit("7b", 0, 6) == 0


def test_dry_run_prints_the_plan_and_writes_nothing(bench, tmp_path, monkeypatch, capsys):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda p: usage(100 * GB, 0, 76 * GB))
    work = tmp_path / "w"
    assert bench.main(["--size", "7b", "--workdir", str(work), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "7b shapes, " in out and " of 32 layers: 3 inputs + 3 outputs" in out
    assert not work.exists()  # a dry run leaves nothing, not even the workdir it made
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda p: usage(100 * GB, 0, GB))
    assert bench.main(["--size", "7b", "--workdir", str(work), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench_sweep: ") and "\n" not in err
