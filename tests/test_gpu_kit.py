"""The GPU check kit (benchmarks/gpu_check.sh + benchmarks/gpu.py) on a machine without a GPU:
the dry run lists every step and checks the tools, and the Python parts the kit runs on the GPU
machine (argument parsing, env.json, the JUnit counts and the SUMMARY.md writer) work here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from bench_util import load_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _gpu():
    return load_benchmark("gpu.py", "fm_bench_gpu")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_dry_run_lists_steps_and_tools(tmp_path):
    out = tmp_path / "kit"
    res = subprocess.run(["bash", KIT, "--dry-run", str(out)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr
    for step in ("env", "build", "cuda", "triton", "large", "bench", "summary"):
        assert f"  {step} " in res.stdout, step
    assert "build_ext --inplace" in res.stdout and "-p no:cacheprovider" in res.stdout
    assert "FASTMERGE_LARGE_TESTS=1" in res.stdout
    total = int(res.stdout.split("total time bound: ")[1].split("s")[0])
    assert total <= 600
    assert "torch" in res.stdout and "dry run: nothing was built or run" in res.stdout
    assert "ninja" in res.stdout  # found beside PYTHON too: without it the build is serial
    assert not out.exists()  # a dry run writes nothing


def test_kit_usage_errors():
    res = subprocess.run(["bash", KIT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run(["bash", KIT, "--bogus", "x"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "unknown option --bogus" in res.stderr


def test_argument_parsing():
    gpu = _gpu()
    a = gpu.parse_args(["--kit", "/tmp/x", "--reps", "2"])
    assert a.kit == "/tmp/x" and a.reps == 2
    assert a.shapes == "4096x11008,4096x4096" and a.backends == "cuda,triton"
    assert gpu.parse_shapes(a.shapes) == [(4096, 11008), (4096, 4096)]
    b = gpu.parse_args([])
    assert b.shapes == gpu.DEFAULT_SHAPES and b.backends == "cuda,triton,torch"
    with pytest.raises(SystemExit):
        gpu.parse_args(["--kit", "a", "--summary", "b"])
    assert set(gpu.KIT_METHODS) == {"ties", "dare_ties", "task_arithmetic"}
    assert gpu.merge_pass_bytes(100, 3) == 5 * 100 * 2


def test_env_without_gpu(tmp_path):
    gpu = _gpu()
    assert gpu.main(["--env", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "env.json").read_text())
    assert info["torch"] and info["python"]
    if not info["gpus"]:
        assert info["device"] == "none"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest"
errors="1" failures="2" skipped="3" tests="20" time="1.0"></testsuite></testsuites>"""


def test_summary_writer(tmp_path):
    gpu = _gpu()
    (tmp_path / "steps.tsv").write_text(
        "step\trc\tseconds\tlimit\nenv\t0\t2\t30\nbuild\t0\t95\t180\ncuda\t1\t40\t90\n"
        "triton\t124\t90\t90\nlarge\t0\t20\t60\nbench\t0\t50\t80\n")
    (tmp_path / "cuda.xml").write_text(JUNIT)
    (tmp_path / "large.xml").write_text("not xml")
    (tmp_path / "env.json").write_text(json.dumps(dict(
        device="NVIDIA H200", capability="9.0", memory_gib=139.8, driver="580.1",
        torch="2.11.0+cu130", torch_cuda="13.0", triton="3.6.0", python="3.12.3",
        nvcc="Build cuda_13.0")))
    (tmp_path / "bench.json").write_text(json.dumps(dict(
        copy_gbs=4000.0, skipped={"torch": "x"},
        merge_pass=[dict(shape="4096x11008", n=3, method="ties", backend="cuda", ms=0.2,
                         gbs=2200.0, frac=0.55),
                    dict(shape="4096x4096", n=3, method="dare_ties", backend="triton",
                         error="RuntimeError: boom")],
        streamed=[dict(method="ties", size="0.5b", n=3, backend="cuda", seconds=3.5,
                       input_gb=4.0, gbs=1.3)])))
    path = gpu.write_summary(str(tmp_path))
    text = open(path).read()
    assert "NVIDIA H200" in text and "torch 2.11.0+cu130" in text and "triton 3.6.0" in text
    assert "| cuda | FAILED (1) | 40s / 90s | 14 | 2 | 1 | 3 |" in text
    assert "| triton | TIMEOUT | 90s / 90s | - | - | - | - |" in text
    assert "| large | ok | 20s / 60s | - | - | - | - |" in text   # unreadable XML
    assert "| ties | 4096x11008 | 3 | cuda | 0.200 | 2200 | 55% |" in text
    assert "RuntimeError: boom" in text and "4000 GB/s" in text
    assert "| ties 0.5b N=3 (4.0 GB in) | cuda | 3.50 | 1.3 |" in text
    assert len(text.splitlines()) <= 45  # one screen
    assert not os.path.exists(path + ".tmp")


def test_summary_with_nothing_run(tmp_path):
    gpu = _gpu()
    text = open(gpu.write_summary(str(tmp_path))).read()
    assert "No benchmark results" in text and "device: ?" in text
