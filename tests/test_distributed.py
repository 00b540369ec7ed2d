"""Multi-process merges (torch.distributed, gloo, 2 processes on 127.0.0.1) are bitwise the
single-process merge: whole tensors balanced by bytes, giant tensors split by rows with their
histograms and statistics all-reduced, scope: model, LiNeS alpha: auto, DARE; a rank that
fails fails the job and leaves no output. See docs/distributed.md."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from engine_util import write_yaml

import fastmerge
from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.pipeline import parallel

ROOT = Path(__file__).resolve().parents[1]
SPLIT = "10000"      # bytes: embed/lm_head/up/down (12-16 KB) split by rows, the rest whole
SHARD = "60KB"

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available()
                                     and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", FASTMERGE_SPLIT_BYTES=SPLIT,
               TORCHELASTIC_ERROR_FILE="")
    env.pop("TORCHELASTIC_ERROR_FILE")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _torchrun(args: list, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_ckpts")
    return make_synthetic_checkpoints(root, n_models=3, layers=2, hidden=64, inter=96,
                                      vocab=128, shards=2, moments=True)


W = [0.5, 0.3, 0.2]
D = [0.5, 0.4, 0.3]


def _cfg(ckpts, method, model_params=None, params=None, moments=False, **extra):
    models = []
    for i, m in enumerate(ckpts["models"]):
        e = {"model": str(m)}
        if model_params is not None:
            e["parameters"] = model_params[i]
        if moments:
            e["preconditioner_path"] = str(ckpts["moments"][i])
        models.append(e)
    cfg = {"merge_method": method, "base_model": str(ckpts["base"]), "models": models}
    if params:
        cfg["parameters"] = params
    cfg.update(extra)
    return cfg


def _cases(ckpts) -> dict:
    wd = [{"weight": w, "density": d} for w, d in zip(W, D)]
    return {
        "ties": _cfg(ckpts, "ties", wd),
        "dare_ties": _cfg(ckpts, "dare_ties", wd),                  # mergekit: rescale l1
        "dare_linear": _cfg(ckpts, "dare_linear", wd, {"rescale": False}),
        "breadcrumbs_ties": _cfg(ckpts, "breadcrumbs_ties", wd, {"normalize": True}),
        "consensus_ties": _cfg(ckpts, "consensus_ties", wd),
        "ties_scope_model": _cfg(ckpts, "ties", wd, scope="model"),
        "dare_ties_scope_model": _cfg(ckpts, "dare_ties", wd, scope="model"),
        "lines_auto": _cfg(ckpts, "task_arithmetic", [{"weight": w} for w in W],
                           lines={"alpha": "auto", "beta": 0.3}),
        "ota_ffg": _cfg(ckpts, "ota_ffg", [{"density": 0.3}] * 3,
                        {"ota_normalize": "global"}, moments=True),
    }


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def _assert_identical(got: Path, want: Path, what: str) -> None:
    g, w = _files(got), _files(want)
    assert sorted(g) == sorted(w), (what, sorted(g), sorted(w))
    for name in w:
        if name.endswith(".safetensors"):
            assert g[name] == w[name], f"{what}: {name} differs from the single-process merge"
    gi = json.loads(g["model.safetensors.index.json"])
    wi = json.loads(w["model.safetensors.index.json"])
    assert gi == wi, what


WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="env://")
    import fastmerge
    for cfg, out in json.loads(open(sys.argv[1]).read()):
        fastmerge.merge_checkpoints(cfg, out, shard_size=%r, seed=7, quiet=True)
    dist.barrier()
    dist.destroy_process_group()
""" % SHARD)


def test_partition_covers_every_element_once():
    names = ["emb", "a", "b", "c", "head", "norm"]
    sizes = {"emb": 4000, "a": 300, "b": 200, "c": 250, "head": 4000, "norm": 10}
    shapes = {"emb": (1000, 2), "a": (10, 15), "b": (10, 10), "c": (5, 25), "head": (7, 2),
              "norm": (5,)}
    for k in (1, 2, 3, 8):
        parts = [parallel.partition(names, sizes, shapes, r, k) for r in range(k)]
        seen = {n: [] for n in names}
        for p in parts:
            for n in p.names:
                for s, e in parallel.local_ranges(shapes[n], 7, p.rows.get(n)):
                    seen[n] += list(range(s, e))
        for n in names:
            numel = int(torch.tensor(shapes[n]).prod())
            assert sorted(seen[n]) == list(range(numel)), (k, n)
        if k > 1:   # giant tensors (with >= k rows) split, first, on every rank
            assert list(parts[0].rows) == ["emb"] + (["head"] if k <= 7 else [])
            assert all(p.names[:len(p.rows)] == list(p.rows) for p in parts)
    assert parallel.reducer() is None and parallel.world() == (0, 1)


def test_two_processes_match_one_bitwise(ckpts, tmp_path):
    """Several methods in one 2-process launch (gloo), each against the 1-process merge."""
    cases = _cases(ckpts)
    jobs = []
    for name, cfg in cases.items():
        path = write_yaml(tmp_path / f"{name}.yml", cfg)
        single = fastmerge.merge_checkpoints(str(path), tmp_path / f"{name}_1", seed=7,
                                             shard_size=SHARD)
        assert single.shards > 1
        jobs.append((str(path), str(tmp_path / f"{name}_2")))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "worker.py").write_text(WORKER)
    r = _torchrun([str(tmp_path / "worker.py"), str(tmp_path / "jobs.json")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in cases:
        _assert_identical(tmp_path / f"{name}_2", tmp_path / f"{name}_1", name)
    idx = json.loads((tmp_path / "ties_scope_model_2" / "model.safetensors.index.json")
                     .read_text())
    assert idx["metadata"]["resolved"]["model_elements"] == sum(
        int(torch.tensor(s).prod()) for s in _shapes(ckpts))


def _shapes(ckpts):
    from safetensors import safe_open
    out = []
    for f in sorted(Path(ckpts["base"]).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out += [h.get_slice(k).get_shape() for k in h.keys()]
    return out


def test_torchrun_cli_merge_is_the_single_process_merge(ckpts, tmp_path):
    cfg = write_yaml(tmp_path / "c.yml", _cases(ckpts)["dare_ties"])
    single = tmp_path / "one"
    from fastmerge.cli import main
    assert main(["merge", str(cfg), str(single), "--quiet", "--seed", "7",
                               "--shard-size", SHARD]) == 0
    out = tmp_path / "two"
    r = _torchrun(["-m", "fastmerge", "merge", str(cfg), str(out), "--quiet", "--seed", "7",
                   "--shard-size", SHARD])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("fastmerge: dare_ties merged") == 2
    _assert_identical(out, single, "torchrun CLI dare_ties")
    assert (out / "README.md").exists() and (out / "config.json").exists()


def test_a_failing_rank_fails_the_job_and_leaves_no_output(ckpts, tmp_path):
    cfg = write_yaml(tmp_path / "c.yml", _cases(ckpts)["ties"])
    out = tmp_path / "out"
    r = _torchrun(["-m", "fastmerge", "merge", str(cfg), str(out), "--quiet",
                   "--shard-size", SHARD], FASTMERGE_TEST_FAIL_RANK="1:3")
    assert r.returncode != 0
    assert "fastmerge: error: rank 1 of 2: " in r.stderr and "injected failure" in r.stderr, \
        r.stderr[-3000:]
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if "fastmerge-tmp" in p.name]
