"""Real ``python -m fastmerge merge`` processes stopped by signals at known points, and racing
each other or a user for OUT_DIR (docs/guarantees.md, "Output" and "Signals and crashes").

The runs wait at a named point through the test hook FASTMERGE_TEST_PAUSE_AT=<stage>
(fastmerge/output/writer.py ``pause_point``: "tmp-created", "mid-write", "commit") until the
file FASTMERGE_TEST_RESUME names exists or a signal is caught."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_util import index_of, load_dir, write_yaml

from fastmerge.cli.demo import make_synthetic_checkpoints

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
STAGES = ("tmp-created", "mid-write", "commit")


@pytest.fixture
def job(tmp_path):
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=2, hidden=32, inter=48,
                                   vocab=64, shards=2, only=("q_proj",))
    cfg = {"merge_method": "ties", "base_model": str(p["base"]),
           "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}}
                      for m in p["models"]]}
    return {"cfg": write_yaml(tmp_path / "merge.yml", cfg), "out": tmp_path / "work" / "out",
            "dir": tmp_path}


def _default_signals():   # inherited "ignore" (nohup, some CI shells) would hide the handlers
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class Run:
    """One ``fastmerge merge`` process; ``pause`` makes it wait at that stage."""
    count = 0

    def __init__(self, job, pause=None, overwrite=False):
        Run.count += 1
        self.err = job["dir"] / f"stderr-{Run.count}.txt"
        self.resume = job["dir"] / f"resume-{Run.count}"
        env = dict(os.environ, FASTMERGE_TEST_RESUME=str(self.resume))
        env.pop("FASTMERGE_TEST_PAUSE_AT", None)
        if pause:
            env["FASTMERGE_TEST_PAUSE_AT"] = pause
        cmd = [sys.executable, "-m", "fastmerge", "merge", str(job["cfg"]), str(job["out"]),
               "--quiet"] + (["--overwrite"] if overwrite else [])
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=_default_signals)
        if pause:
            self.wait_for(f"paused at {pause}")

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, text: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while text not in self.stderr():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr()}"
            assert time.monotonic() < end, f"no {text!r} in {self.stderr()!r}"
            time.sleep(0.01)

    def go(self) -> None:
        self.resume.write_text("")

    def finish(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)


def temporaries(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def entries(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []


def assert_complete(d: Path) -> None:
    idx = index_of(d)
    got = load_dir(d)
    assert set(got) == set(idx["weight_map"]) and got
    assert not [p.name for p in d.iterdir() if "fastmerge-lock" in p.name]


def fails_keeping_output(run: Run, expect: str) -> tuple:
    """Lets ``run`` go on; it must fail (exit 1) with ``expect`` in its last stderr line, which
    names where its output was kept: (that line, that directory)."""
    run.go()
    assert run.finish() == 1
    msg = run.stderr().strip().splitlines()[-1]
    assert expect in msg, msg
    return msg, Path(msg.rsplit("output is in ", 1)[-1])


@pytest.mark.parametrize("stage", ["tmp-created", "mid-write"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_cleans_up_and_exits_128_plus_signum(job, stage, sig):
    run = Run(job, pause=stage)
    assert temporaries(job["out"])              # the temporary directory exists now
    run.proc.send_signal(sig)
    assert run.finish() == 128 + sig
    lines = run.stderr().strip().splitlines()
    assert lines[-1] == ("fastmerge: interrupted; no output was written" if sig == signal.SIGINT
                         else f"fastmerge: stopped by {signal.Signals(sig).name}; no output "
                              f"was written")
    assert "Traceback" not in run.stderr()
    # nothing left: no output, no temporary, and not the parent directory the run created
    assert not job["out"].parent.exists(), entries(job["out"])


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_leftover_is_removed_by_the_next_run(job, stage):
    run = Run(job, pause=stage)
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    left = temporaries(job["out"])
    assert len(left) == 1 and f"-{run.proc.pid}-" in left[0]
    assert not job["out"].exists()
    assert Run(job).finish() == 0
    assert_complete(job["out"])
    assert entries(job["out"]) == ["out"]       # the dead run's temporary is gone


def test_two_runs_racing_for_one_out_dir(job):
    first = Run(job, pause="tmp-created")      # the slower run: started first, ends last
    second = Run(job)
    assert second.finish() == 0, second.stderr()
    assert_complete(job["out"])
    ident = os.stat(job["out"]).st_ino
    assert len(temporaries(job["out"])) == 1   # the live run's temporary was not touched
    msg, kept = fails_keeping_output(first, "appeared")
    assert msg.startswith("fastmerge: error: output directory"), msg
    assert kept.parent == job["out"].parent and kept.name.startswith("out.fastmerge-")
    assert_complete(kept)
    assert os.stat(job["out"]).st_ino == ident  # the winner's output untouched
    assert_complete(job["out"])
    assert entries(job["out"]) == sorted(["out", kept.name])


def test_out_dir_created_by_the_user_mid_run_is_left_alone(job):
    run = Run(job, pause="commit")
    job["out"].mkdir()
    (job["out"] / "mine.txt").write_text("user data")
    _, kept = fails_keeping_output(run, "appeared while this merge ran")
    assert_complete(kept)
    assert [p.name for p in job["out"].iterdir()] == ["mine.txt"]
    assert (job["out"] / "mine.txt").read_text() == "user data"
    assert not temporaries(job["out"])


def test_overwrite_replaces_only_the_directory_present_at_the_start(job):
    job["out"].mkdir(parents=True)
    (job["out"] / "old.txt").write_text("old")
    run = Run(job, pause="tmp-created", overwrite=True)
    # the user swaps OUT_DIR for another directory while the merge runs
    os.rename(job["out"], job["dir"] / "work" / "moved")
    job["out"].mkdir()
    (job["out"] / "new.txt").write_text("new")
    _, kept = fails_keeping_output(run, "no longer the directory --overwrite was to replace")
    assert_complete(kept)
    assert [p.name for p in job["out"].iterdir()] == ["new.txt"]
    assert (job["dir"] / "work" / "moved" / "old.txt").read_text() == "old"
    # and an --overwrite of the directory that is there replaces it
    assert Run(job, overwrite=True).finish() == 0
    assert_complete(job["out"])
    assert not (job["out"] / "new.txt").exists()
    assert not temporaries(job["out"])
