"""The GPU kit's sweep step (benchmarks/gpu_sweep.py, run by benchmarks/gpu_check.sh) on the
CPU: the dry run lists it within the kit's time bound, and the script runs end to end on tiny
checkpoints (backend "cpu"), checking each point against its merge."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench_util import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _kit_sweep():
    return load_benchmark("gpu_sweep.py", "fm_gpu_sweep")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_dry_run_lists_the_sweep_step():
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("  sweep "))
    assert "gpu_sweep.py" in line and "--backends cuda,triton" in line
    assert int(res.stdout.split("total time bound: ")[1].split("s")[0]) <= 600


def test_the_sweep_step_runs_on_the_cpu(tmp_path, monkeypatch):
    kit = _kit_sweep()
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert kit.main([str(tmp_path), "--size", "tiny", "--backends", "cpu",
                     "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "sweep.json").read_text())
    (row,) = res["rows"]
    assert row["k"] == 3 and row["byte_identical"] and row["speedup"] > 0
    md = (tmp_path / "sweep.md").read_text()
    assert "| cpu |" in md and "| yes |" in md
    res["rows"].append({"backend": "cuda", "error": "unavailable: no GPU"})
    assert "ERROR: unavailable: no GPU" in "\n".join(kit.table(res))
