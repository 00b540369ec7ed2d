"""scripts/check_gpu_toolchain.sh (the opt-in build check against a CUDA torch) stays runnable:
it parses, --help and its usage errors work, it refuses a CPU torch before copying or building
anything, and CI never runs it. Cheap: no build, no CUDA torch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_gpu_toolchain.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


def _run(*args, **env):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **env))


def test_script_parses():
    res = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_help_names_every_step_and_says_no_gpu():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    for step in ("env", "build", "import", "triton", "compile", "interp", "kit"):
        assert f"  {step} " in res.stdout, step
    assert "WITHOUT a GPU" in res.stdout and "never run by .ci/run" in res.stdout
    assert "torch==2.11.0" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option --bogus"),
    (["/nonexistent-venv"], "no /nonexistent-venv/bin/python"),
    (["a", "b"], "one VENV only"),
    (["--out"], "--out needs a directory"),
])
def test_usage_errors_are_one_line(args, message):
    res = _run(*args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_refuses_a_cpu_torch(tmp_path):
    """This interpreter's torch (CI's is the CPU build) is refused before anything is copied."""
    import torch
    if torch.version.cuda:
        pytest.skip("this torch is a CUDA build")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    res = _run(str(venv), TMPDIR=str(tmp_path))
    assert res.returncode == 2 and "CPU build of torch" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["venv"]  # no copy was made


def test_ci_never_runs_it():
    ci = os.path.join(ROOT, ".ci", "run")
    if not os.path.exists(ci):
        pytest.skip("no .ci/run in this checkout")
    assert "check_gpu_toolchain" not in open(ci).read()

