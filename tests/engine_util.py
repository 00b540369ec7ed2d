"""Shared by the engine tests: synthetic checkpoints, loading outputs, expected merges."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from fastmerge.api import merge_tensors


def fail_writes_after(monkeypatch, n: int):
    """ShardWriter.pwrite fails with ENOSPC (disk full) from its (n + 1)-th call on; returns
    the real pwrite (to put back)."""
    from fastmerge.output.writer import ShardWriter
    calls = {"n": 0}
    real = ShardWriter.pwrite

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)
    monkeypatch.setattr(ShardWriter, "pwrite", staticmethod(full))
    return real


def cli_merge_without_torch(yml, out, flag: str) -> subprocess.CompletedProcess:
    """``fastmerge merge yml out flag`` in a fresh interpreter, which asserts that it exits 0
    without importing torch; its exit status is the returned process's."""
    code = ("import sys; from fastmerge.cli import main; "
            f"rc = main(['merge', {str(yml)!r}, {str(out)!r}, {flag!r}]); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def load_dir(d) -> dict:
    d = Path(d)
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same_dirs(a, b) -> None:
    """The two output folders hold the same files, byte for byte."""
    a, b = Path(a), Path(b)
    names = sorted(x.name for x in a.iterdir())
    assert names == sorted(x.name for x in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), (a, n)


def merge_each_point(tmp_path, rows) -> None:
    """Each sweep point (a row of sweep.json) is byte for byte ``fastmerge merge`` of its own
    config (the one the sweep wrote beside it)."""
    from fastmerge.cli import main
    for r in rows:
        one = tmp_path / "single" / r["point"]
        cfg = tmp_path / f"{r['point']}.yml"
        cfg.write_text((Path(r["path"]) / "fastmerge_config.yml").read_text())
        assert main(["merge", str(cfg), str(one), "--quiet"]) == 0
        same_dirs(r["path"], one)


def write_yaml(path, cfg: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def check_against_reference(got: dict, paths, method, params_for, **common) -> None:
    """Every output tensor equals the float64 per-tensor reference merge within docs/semantics.md's
    tolerance (fastmerge.testing); params_for(name) -> the merge's kwargs for that tensor."""
    from fastmerge.testing import assert_matches_reference
    base = load_dir(paths["base"])
    models = [load_dir(m) for m in paths["models"]]
    assert set(got) == set(base)
    for name, b in base.items():
        kw = dict(common)
        kw.update(params_for(name))
        assert_matches_reference(got[name], b if method != "linear" else None,
                                 [m[name] for m in models], method, tensor_name=name, **kw)


def expected_merge(paths, method, params_for, **common) -> dict:
    """Per-tensor merges with merge_tensors(backend="torch"); params_for(name) -> kwargs."""
    base = load_dir(paths["base"])
    models = [load_dir(m) for m in paths["models"]]
    out = {}
    for name, b in base.items():
        kw = dict(common)
        kw.update(params_for(name))
        out[name] = merge_tensors(b if method != "linear" else None, [m[name] for m in models],
                                  method, tensor_name=name, backend="torch", **kw)
    return out


def assert_same(got: dict, want: dict, exact: bool = True):
    assert set(got) == set(want), set(got) ^ set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)
        assert got[k].shape == want[k].shape, k
        if exact:
            assert torch.equal(got[k], want[k]), (k, (got[k].float() - want[k].float()).abs().max())
        else:
            torch.testing.assert_close(got[k].float(), want[k].float(), rtol=2e-2, atol=1e-4)


def index_of(d) -> dict:
    return json.loads((Path(d) / "model.safetensors.index.json").read_text())
