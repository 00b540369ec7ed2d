"""Hub inputs checked from config.json, the index and the safetensors headers before any weight
is downloaded (checkpoint/hub_headers.py): huggingface_hub's functions replaced by fakes over
local checkpoints, which log every call, so the order of header reads and downloads shows."""
from __future__ import annotations

import fnmatch
import json
import shutil
import struct
from pathlib import Path

import huggingface_hub
import pytest
from engine_util import load_dir, write_yaml
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    NotASafetensorsRepoError,
)
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

from fastmerge.cli import main
from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.pipeline import CheckpointError, ConfigError, native

INDEX = "model.safetensors.index.json"


def _header(path: Path) -> SafetensorsFileMetadata:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8:8 + n])
    return SafetensorsFileMetadata(
        metadata=h.pop("__metadata__", {}),
        tensors={k: TensorInfo(dtype=v["dtype"], shape=v["shape"],
                               data_offsets=tuple(v["data_offsets"])) for k, v in h.items()})


class FakeHub:
    """repo id -> a local directory; a cache directory as the HF cache; ``log`` of calls."""

    def __init__(self, root: Path):
        self.repos, self.cache, self.log = {}, root / "hf-cache", []
        self.edit_header = None    # (repo, file metadata) -> file metadata, to break one

    def snapshot(self, repo_id):
        return self.cache / repo_id.replace("/", "--")

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None,
                          local_files_only=False, **kw):
        d = self.snapshot(repo_id)
        if local_files_only:
            if not d.is_dir():
                raise LocalEntryNotFoundError(f"{repo_id} not in the cache")
            return str(d)
        self.log.append(("snapshot_download", repo_id))
        d.mkdir(parents=True, exist_ok=True)
        for f in self.repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns or ["*"]):
                shutil.copy(f, d / f.name)
        return str(d)

    def hf_hub_download(self, repo_id, filename, revision=None, **kw):
        self.log.append(("hf_hub_download", repo_id, filename))
        assert not filename.endswith((".safetensors", ".bin")), "a weight file downloaded"
        src = self.repos[repo_id] / filename
        if not src.exists():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        d = self.snapshot(repo_id)
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, d / filename)
        return str(d / filename)

    def _file_meta(self, repo_id, fn):
        meta = _header(self.repos[repo_id] / fn)
        return self.edit_header(repo_id, fn, meta) if self.edit_header else meta

    def get_safetensors_metadata(self, repo_id, revision=None, token=None, **kw):
        self.log.append(("get_safetensors_metadata", repo_id))
        d = self.repos[repo_id]
        if (d / INDEX).exists():
            wmap = json.loads((d / INDEX).read_text())["weight_map"]
        elif (d / "model.safetensors").exists():
            wmap = {k: "model.safetensors" for k in _header(d / "model.safetensors").tensors}
        else:
            raise NotASafetensorsRepoError(f"{repo_id} is not a safetensors repo")
        files = {fn: self._file_meta(repo_id, fn) for fn in sorted(set(wmap.values()))}
        return SafetensorsRepoMetadata(metadata=None, sharded=(d / INDEX).exists(),
                                       weight_map=wmap, files_metadata=files)

    def parse_safetensors_file_metadata(self, repo_id, filename, revision=None, **kw):
        self.log.append(("parse_safetensors_file_metadata", repo_id, filename))
        if not (self.repos[repo_id] / filename).exists():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return self._file_meta(repo_id, filename)

    def downloads(self):
        return [c for c in self.log if c[0] == "snapshot_download"]

    def header_reads(self):
        return [c for c in self.log if c[0] != "snapshot_download"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    p = make_synthetic_checkpoints(root / "a", n_models=2, layers=2, hidden=32, inter=48,
                                   vocab=64, shards=2)
    p["deep"] = make_synthetic_checkpoints(root / "b", n_models=1, layers=3, hidden=32,
                                           inter=48, vocab=64, shards=1)["models"][0]
    return p


@pytest.fixture
def hub(ckpts, tmp_path, monkeypatch):
    fake = FakeHub(tmp_path)
    fake.repos = {"org/base": ckpts["base"], "org/m0": ckpts["models"][0],
                  "org/m1": ckpts["models"][1], "org/deep": ckpts["deep"]}
    for name in ("snapshot_download", "hf_hub_download", "get_safetensors_metadata",
                 "parse_safetensors_file_metadata"):
        monkeypatch.setattr(huggingface_hub, name, getattr(fake, name))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return fake


def _cfg(method="ties", base="org/base", models=("org/m0", "org/m1"), **extra):
    return {"merge_method": method, "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}}
                       for m in models], **extra}


def test_a_good_config_downloads_only_after_every_header_is_checked(hub, ckpts, tmp_path):
    native.merge(_cfg(), tmp_path / "out")
    first_download = hub.log.index(hub.downloads()[0])
    checked = {c[1] for c in hub.log[:first_download] if c[0] == "get_safetensors_metadata"}
    assert checked == {"org/base", "org/m0", "org/m1"}
    assert {c[1] for c in hub.downloads()} == {"org/base", "org/m0", "org/m1"}
    # the same merge as from the local directories
    local = _cfg(base=str(ckpts["base"]), models=[str(m) for m in ckpts["models"]])
    native.merge(local, tmp_path / "local")
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "local")
    assert set(got) == set(want) and all((got[k] == want[k]).all() for k in want)


def test_a_method_typo_fails_before_anything_is_fetched(hub, tmp_path):
    with pytest.raises(ConfigError, match="tiez"):
        native.merge(_cfg("tiez"), tmp_path / "out")
    assert hub.log == []


def test_a_bad_parameter_fails_before_download(hub, tmp_path):
    bad = _cfg()
    bad["models"][1]["parameters"]["density"] = 2
    with pytest.raises(ValueError, match="density"):
        native.merge(bad, tmp_path / "out")
    assert hub.header_reads() and not hub.downloads()


def test_a_missing_tensor_fails_before_download(hub, ckpts, tmp_path):
    # a model with one tensor less: a single model.safetensors without it
    from safetensors.torch import load_file, save_file
    d = tmp_path / "short"
    d.mkdir()
    tensors = {}
    for f in Path(ckpts["models"][1]).glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    gone = sorted(tensors)[3]
    del tensors[gone]
    save_file(tensors, str(d / "model.safetensors"))
    shutil.copy(Path(ckpts["models"][1]) / "config.json", d / "config.json")
    hub.repos["org/short"] = d
    with pytest.raises(CheckpointError) as e:
        native.merge(_cfg(models=("org/m0", "org/short")), tmp_path / "out")
    assert "'org/short'" in str(e.value) and repr(gone) in str(e.value)
    assert "\n" not in str(e.value) and not hub.downloads()


def test_a_layer_count_mismatch_fails_before_download(hub, tmp_path):
    with pytest.raises(CheckpointError, match="model.layers.2.* is not in the base model"):
        native.merge(_cfg(models=("org/m0", "org/deep")), tmp_path / "out")
    assert not hub.downloads()
    sliced = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": "org/m0", "layer_range": [0, 2]}]},
                         {"sources": [{"model": "org/m1", "layer_range": [0, 3]}]}]}
    cfg = write_yaml(tmp_path / "s.yml", sliced)
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 2
    assert not hub.downloads()


def test_a_bad_hub_header_is_one_line_with_model_file_and_tensor(hub, tmp_path, capsys):
    def edit(repo, fn, meta):
        if repo == "org/m1" and fn.endswith("00002-of-00002.safetensors"):
            name = sorted(meta.tensors)[0]
            meta.tensors[name].data_offsets = (0, 7)
        return meta
    hub.edit_header = edit
    cfg = write_yaml(tmp_path / "c.yml", _cfg())
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "org/m1/model-00002-of-00002.safetensors" in err
    assert "tensor '" in err and "data_offsets" in err
    assert not hub.downloads()


def test_dry_run_reads_headers_and_never_downloads(hub, tmp_path):
    text = native.dry_run(_cfg(), tmp_path / "out")
    assert "dry run of ties (2 models" in text and "output tensors:" in text
    assert not hub.downloads() and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="lacks tensor|is not in the base model"):
        native.dry_run(_cfg(models=("org/m0", "org/deep")), tmp_path / "out")
    assert not hub.downloads()


def test_bin_only_repo_is_said_and_the_merge_goes_on_as_before(hub, ckpts, tmp_path):
    d = tmp_path / "binrepo"
    d.mkdir()
    shutil.copy(Path(ckpts["base"]) / "config.json", d / "config.json")
    hub.repos["org/bin"] = d
    with pytest.raises(CheckpointError, match="cannot be checked before download .pickles"):
        native.dry_run(_cfg(models=("org/m0", "org/bin")), tmp_path / "out")
    assert not hub.downloads()
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        native.merge(_cfg(models=("org/m0", "org/bin")), tmp_path / "out")
    assert ("snapshot_download", "org/bin") in hub.downloads()   # as before: downloaded


def test_cached_models_work_offline(hub, tmp_path, monkeypatch):
    native.merge(_cfg(), tmp_path / "out")
    hub.log.clear()

    def refuse(*a, **k):
        raise AssertionError("network while offline")
    for name in ("hf_hub_download", "get_safetensors_metadata"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "dry run of ties" in native.dry_run(_cfg(), tmp_path / "o2")
    native.merge(_cfg(), tmp_path / "o3")
    assert load_dir(tmp_path / "o3").keys() == load_dir(tmp_path / "out").keys()
    with pytest.raises(CheckpointError, match="offline"):
        native.dry_run(_cfg(models=("org/m0", "org/deep")), tmp_path / "o4")


def test_a_hub_adapter_is_checked_from_its_header_too(hub, ckpts, tmp_path):
    from ckpt_util import write_adapter
    sd = load_dir(ckpts["base"])
    hub.repos["org/ad"] = write_adapter(tmp_path / "ad", sd, ["up_proj"], r=4, alpha=8)
    hub.repos["org/other"] = write_adapter(
        tmp_path / "other", {k: v[:, :16] for k, v in sd.items() if v.dim() == 2},
        ["up_proj"], r=4, alpha=8)
    with pytest.raises(CheckpointError, match=r"org/other/adapter_model.safetensors, tensor "):
        native.merge(_cfg("linear", base=None, models=("org/base+org/other", "org/m0")),
                     tmp_path / "bad")
    assert not hub.downloads()
    native.merge(_cfg("linear", base=None, models=("org/base+org/ad", "org/m0")),
                 tmp_path / "out")
    first = hub.log.index(hub.downloads()[0])
    assert ("parse_safetensors_file_metadata", "org/ad", "adapter_model.safetensors") in \
        hub.log[:first]
    assert ("snapshot_download", "org/ad") in hub.downloads()


def test_a_model_in_the_real_cache_layout_is_read_from_it_without_network(ckpts, tmp_path,
                                                                          monkeypatch):
    """huggingface_hub's own snapshot_download(local_files_only=True) finds the cached
    snapshot: nothing is fetched, online or not."""
    import huggingface_hub.constants as hc

    from fastmerge.pipeline.sliced import hub_downloads
    commit = "b" * 40
    repo = tmp_path / "hub" / "models--acme--base"
    shutil.copytree(ckpts["base"], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*a, **k):
        raise AssertionError("network for a cached model")
    for name in ("hf_hub_download", "get_safetensors_metadata"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    cfg = _cfg(base="acme/base", models=[str(m) for m in ckpts["models"]])
    from fastmerge.recipe.config import load_config
    assert not hub_downloads(load_config(cfg))
    assert "dry run of ties" in native.dry_run(cfg, tmp_path / "out")
