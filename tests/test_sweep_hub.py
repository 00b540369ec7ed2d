"""A sweep over hub models checks everything it can before any weight is downloaded, as
``fastmerge merge`` does (tests/test_hub_precheck.py, whose fake hub logs every call): every
point resolved on the config.json, indexes and safetensors headers, the passes planned
against the memory budget and the K outputs against the free disk."""
from __future__ import annotations

import collections

import pytest
import test_hub_precheck
from engine_util import load_dir
from test_hub_precheck import _cfg

import fastmerge.pipeline.sweep as sw
from fastmerge.pipeline import CheckpointError, ConfigError, native

pytestmark = pytest.mark.skipif(native._core() is None, reason="fastmerge._core not built")
GRID = ["density=0.3,0.6"]


# the fixtures of tests/test_hub_precheck.py: its synthetic checkpoints behind its fake hub
ckpts, hub = test_hub_precheck.ckpts, test_hub_precheck.hub


def test_headers_are_checked_before_the_download_and_points_match_local(hub, ckpts, tmp_path):
    rows = sw.sweep(_cfg(), tmp_path / "out", GRID + ["merge_method=ties,linear"])
    first = hub.log.index(hub.downloads()[0])
    assert {c[1] for c in hub.log[:first] if c[0] == "get_safetensors_metadata"} == \
        {"org/base", "org/m0", "org/m1"}
    assert sorted({c[1] for c in hub.downloads()}) == ["org/base", "org/m0", "org/m1"]
    local = _cfg(base=str(ckpts["base"]), models=[str(m) for m in ckpts["models"]])
    want = sw.sweep(local, tmp_path / "local", GRID + ["merge_method=ties,linear"])
    assert [r["point"] for r in rows] == [r["point"] for r in want]
    for r, w in zip(rows, want):   # the same tensors (the metadata names the inputs)
        got, exp = load_dir(r["path"]), load_dir(w["path"])
        assert got.keys() == exp.keys() and all((got[k] == exp[k]).all() for k in exp)


def _sliced(m0="org/m0", m1="org/m1"):
    """passthrough over slices: a copied source (scale 1) and a scaled one read differently,
    so the scale-2 point opens inputs of its own (sweep._point_inputs)."""
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": m0, "layer_range": [0, 2]}]},
                       {"sources": [{"model": m1, "layer_range": [1, 2]}]}]}


SLICED_GRID = ["slices[0].sources[0].scale=1,2"]


def _same_points(rows, want):
    assert [r["point"] for r in rows] == [r["point"] for r in want]
    for r, w in zip(rows, want):
        got, exp = load_dir(r["path"]), load_dir(w["path"])
        assert got.keys() == exp.keys() and all((got[k] == exp[k]).all() for k in exp)


def test_a_sliced_sweep_checks_every_points_inputs_before_download(hub, ckpts, tmp_path,
                                                                   monkeypatch):
    opened = []
    real = sw.open_headers_only

    def spy(cfg, moments):
        opened.append(cfg.raw["slices"][0]["sources"][0].get("parameters"))
        return real(cfg, moments)
    monkeypatch.setattr(sw, "open_headers_only", spy)
    rows = sw.sweep(_sliced(), tmp_path / "out", SLICED_GRID)
    assert len(opened) == 2 and {"scale": 2} in opened   # the second point's own inputs
    first = hub.log.index(hub.downloads()[0])
    assert {c[1] for c in hub.log[:first] if c[0] == "get_safetensors_metadata"} == \
        {"org/m0", "org/m1"}
    assert [r["pass"] for r in rows] == [1, 2]
    local = _sliced(str(ckpts["models"][0]), str(ckpts["models"][1]))
    _same_points(rows, sw.sweep(local, tmp_path / "local", SLICED_GRID))


def test_a_sliced_point_whose_headers_cannot_be_read_goes_on(hub, ckpts, tmp_path,
                                                            monkeypatch):
    """Where a point's own inputs cannot be opened from their headers (a .bin-only hub repo:
    open_headers_only gives None), the pre-check stops there and the sweep goes on as a merge
    does: the weights downloaded, every point merged."""
    calls = []
    real = sw.open_headers_only

    def second_unreadable(cfg, moments):
        calls.append(cfg)
        return real(cfg, moments) if len(calls) == 1 else None
    monkeypatch.setattr(sw, "open_headers_only", second_unreadable)
    rows = sw.sweep(_sliced(), tmp_path / "out", SLICED_GRID)
    assert len(calls) == 2 and hub.downloads()
    local = _sliced(str(ckpts["models"][0]), str(ckpts["models"][1]))
    _same_points(rows, sw.sweep(local, tmp_path / "local", SLICED_GRID))


def test_a_layer_count_mismatch_fails_before_download(hub, tmp_path):
    with pytest.raises(CheckpointError, match="model.layers.2.* is not in the base model"):
        sw.sweep(_cfg(models=("org/m0", "org/deep")), tmp_path / "out", GRID)
    assert hub.header_reads() and not hub.downloads()
    assert not (tmp_path / "out").exists()


def test_a_bad_point_fails_before_anything_is_fetched(hub, tmp_path):
    with pytest.raises(ConfigError, match="density=1.5"):
        sw.sweep(_cfg(), tmp_path / "out", ["density=0.3,1.5"])
    assert not hub.downloads()


def test_disk_and_budget_are_checked_before_download(hub, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="memory budget"):
        sw.sweep(_cfg(), tmp_path / "out", GRID, memory_budget="1MiB", points_per_pass=2)
    assert hub.header_reads() and not hub.downloads()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sw.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9, 1000))
    with pytest.raises(OSError, match="outputs need .* GB free"):
        sw.sweep(_cfg(), tmp_path / "out", GRID)
    assert not hub.downloads() and not (tmp_path / "out").exists()
