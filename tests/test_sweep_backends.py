"""``fastmerge sweep --backend B --device D`` runs every point on that backend: each point
byte for byte ``fastmerge merge --backend B --device D`` of its config. Every registered
backend where it can run (conftest's ``backend`` fixture): Triton on CPU tensors under
TRITON_INTERPRET=1 (set by conftest.py), CUDA and Triton on a GPU where there is one."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import backend_device

import fastmerge.pipeline.sweep as sw
from fastmerge.cli import main
from fastmerge.cli.demo import make_synthetic_checkpoints


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_backends")
    p = make_synthetic_checkpoints(root, n_models=2, layers=1, hidden=32, inter=48,
                                   vocab=64, shards=1)
    path = root / "c.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(p["base"]),
        "models": [{"model": str(m), "parameters": {"weight": w, "density": 0.5}}
                   for m, w in zip(p["models"], (0.6, 0.4))]}))
    return path


def test_each_point_is_merge_on_the_same_backend(cfg, tmp_path, backend, monkeypatch):
    on = ["--backend", backend, "--device", backend_device(backend)]
    out = tmp_path / "sweep"
    shared = []
    real = sw.shared_thresholds

    def spy(members, name, numel, k0, src):
        got = real(members, name, numel, k0, src)
        shared.append((name, sorted(got)))
        return got
    monkeypatch.setattr(sw, "shared_thresholds", spy)
    # two ties points: one shared selection answers both (the interpreter is slow: 2 points)
    assert main(["sweep", str(cfg), str(out), "--grid", "density=0.3,0.7", "--quiet",
                 *on]) == 0
    # every merged tensor's thresholds came from the one selection, for both points
    assert shared and all(points == [0, 1] for _, points in shared), shared
    points = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(points) == 2
    for p in points:
        one = tmp_path / "merge" / p.name
        point_cfg = tmp_path / f"{p.name}.yml"
        point_cfg.write_text((p / "fastmerge_config.yml").read_text())
        assert main(["merge", str(point_cfg), str(one), "--quiet", *on]) == 0
        files = sorted(f.name for f in p.iterdir())
        assert files == sorted(f.name for f in one.iterdir())
        for f in files:
            assert (p / f).read_bytes() == (one / f).read_bytes(), (backend, p.name, f)
        assert f'"backend": "{backend}"'.encode() in (p / "model.safetensors.index.json") \
            .read_bytes()
    assert Path(out / "sweep.csv").exists()
