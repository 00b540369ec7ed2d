"""``fastmerge merge`` without torch (fastmerge/pipeline/native.py, fastmerge._core): every file
of the output byte for byte merge_checkpoints' on backend "cpu" (methods x chunking x dtypes
x LiNeS x shards x copied tensors), the CLI never importing torch, the per-tensor radix
selection on _core after a window miss or over a chunked tensor, and the same errors with nothing
left behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_util import (
    cli_merge_without_torch,
    fail_writes_after,
    load_dir,
    same_dirs,
    write_yaml,
)

import fastmerge
from fastmerge.backends import availability
from fastmerge.cli.demo import make_synthetic_checkpoints, save_checkpoint
from fastmerge.pipeline import CheckpointError, OutputError, load_config, native

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok or native._core() is None,
                                reason=f"cpu kernels or fastmerge._core unavailable: {why}")
ROOT = Path(__file__).resolve().parents[1]
Q = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    p = make_synthetic_checkpoints(root, n_models=3, layers=3, hidden=48, inter=80, vocab=96,
                                   shards=2)
    # model 2 in float32 (mixed dtypes), and an int64 buffer every model holds (copied)
    for k, d in enumerate(p["models"] + [p["base"]]):
        t = load_dir(d)
        if k == 2:
            t = {n: v.float() for n, v in t.items()}
        t["model.rotary.inv_freq_steps"] = torch.arange(7, dtype=torch.int64)
        for f in d.glob("*.safetensors*"):
            f.unlink()
        save_checkpoint(d, t, shards=2)
    return p


def _cfg(p, method, **extra):
    models = [{"model": str(m), "parameters": {"weight": w, "density": d}}
              for m, w, d in zip(p["models"], (0.5, 0.3, 0.4), (0.5, [0.9, 0.4], 0.7))]
    return {"merge_method": method, "base_model": str(p["base"]), "models": models, **extra}


CASES = [
    ("task_arithmetic", {}, {}),
    ("linear", {}, {"max_chunk_elems": 1000}),
    ("dare_linear", {"parameters": {"rescale": False}}, {}),
    ("dare_ties", {"dtype": "bfloat16"}, {"max_chunk_elems": 777}),          # stats per chunk
    ("dare_ties", {"parameters": {"rescale": True}, "out_dtype": "float32"}, {}),
    ("task_arithmetic", {"lines": {"alpha": 0.5, "beta": 1.0}}, {"shard_size": "20KB"}),
    ("ties", {}, {}),                                                        # one-pass top-k
    ("ties", {"parameters": {"rescale": "l1"}, "out_dtype": "float16"}, {}),
    ("breadcrumbs_ties", {"parameters": {"gamma": 0.05}}, {}),               # bands
    ("magnitude_prune", {}, {}),
    ("consensus_ties", {}, {}),
    ("ties", {"scope": "model"}, {}),                           # model-wide radix selection
    ("ties", {"lines": {"alpha": "auto", "beta": 1.0}}, {"max_chunk_elems": 1000}),
]


@pytest.mark.parametrize("method,extra,kw", CASES)
def test_output_is_the_engines_byte_for_byte(ckpts, tmp_path, method, extra, kw):
    cfg = _cfg(ckpts, method, **extra)
    if cfg.get("scope") == "model":   # one density per model over the whole model
        for m in cfg["models"]:
            m["parameters"]["density"] = 0.6
    assert native.why_not(load_config(cfg)) is None
    res = native.merge_natively(load_config(cfg), tmp_path / "native", **kw)
    want = fastmerge.merge_checkpoints(cfg, tmp_path / "engine", backend="cpu", **kw)
    same_dirs(res.output_dir, want.output_dir)
    assert (res.tensors, res.shards, res.bytes_in, res.bytes_out) == \
        (want.tensors, want.shards, want.bytes_in, want.bytes_out)
    assert res.passes[-1] == "merge (without torch: fastmerge._core)"


@pytest.mark.parametrize("method", ["dare_ties", "breadcrumbs_ties"])
def test_cli_merges_without_importing_torch(ckpts, tmp_path, method):
    yml = write_yaml(tmp_path / "m.yml", _cfg(ckpts, method))
    r = cli_merge_without_torch(yml, tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"{method} merged" in r.stdout
    want = fastmerge.merge_checkpoints(_cfg(ckpts, method), tmp_path / "engine",
                                       backend="cpu")
    same_dirs(tmp_path / "out", want.output_dir)


def test_import_fastmerge_is_lazy_and_registers_ops_on_use():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import sys, fastmerge; assert 'torch' not in sys.modules; "
            "f = fastmerge.merge_tensors; import torch; "
            "assert hasattr(torch.ops.fastmerge, 'fused_merge')")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_core_links_no_libtorch():
    """fastmerge._core (csrc/bindings/core.cpp + the kernels' static library) needs no torch
    library: none of libtorch*/libc10* is among the shared object's needed libraries."""
    blob = Path(native._core().__file__).read_bytes()
    assert b"libtorch" not in blob and b"libc10" not in blob


def test_only_second_moments_take_the_engine(ckpts):
    assert "second moments" in native.why_not(load_config(_cfg(ckpts, "ota")))
    for change in (dict(merge_method="ties", scope="model"),
                   dict(lines={"alpha": "auto", "beta": 1.0})):
        assert native.why_not(load_config({**_cfg(ckpts, "ties"), **change})) is None


def test_device_backend_env_and_torchrun_take_the_engine(ckpts, monkeypatch):
    cfg = load_config(_cfg(ckpts, "task_arithmetic"))
    assert native.why_not(cfg, "cuda") is not None
    assert native.why_not(cfg, "cpu", "torch") is not None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "torchrun" in native.why_not(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("FASTMERGE_NATIVE", "0")
    assert native.why_not(cfg) == "FASTMERGE_NATIVE=0"


@pytest.mark.parametrize("why", ["miss", "chunked"])
def test_a_window_miss_or_chunked_selection_takes_the_radix_selection(ckpts, tmp_path,
                                                                           monkeypatch, why):
    """A sampled window that missed, or a selection over a tensor split into chunks: that
    tensor's selection runs the radix selection (on _core's histograms, without torch); the
    merge goes on, on the same kernels, and its output is the engine's."""
    from fastmerge.pipeline import core_kernels
    cfg = _cfg(ckpts, "breadcrumbs_ties")
    kw = {"max_chunk_elems": 1000} if why == "chunked" else {}
    if why == "miss":
        monkeypatch.setattr(core_kernels, "one_pass", lambda *a, **k: None)
    radix = core_kernels.CoreKernels.radix
    seen = []

    def counted(self, source, *a, **k):
        seen.append(1)
        return radix(self, source, *a, **k)
    monkeypatch.setattr(core_kernels.CoreKernels, "radix", counted)
    res = native.merge(cfg, tmp_path / "out", **kw)
    assert res.passes == ["merge (without torch: fastmerge._core)"]
    merged = [n for n in load_dir(ckpts["base"]) if n != "model.rotary.inv_freq_steps"]
    numel = {n: t.numel() for n, t in load_dir(ckpts["base"]).items()}
    want = len(merged) if why == "miss" else sum(numel[n] > 1000 for n in merged)
    assert 0 < len(seen) == want
    same_dirs(res.output_dir, fastmerge.merge_checkpoints(cfg, tmp_path / "e", backend="cpu",
                                                           **kw).output_dir)


# ------------------------------------------------------------------ errors, nothing left behind
@pytest.fixture
def tiny(tmp_path):
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=2, hidden=32, inter=48,
                                   vocab=64, shards=2, only=("q_proj",))
    p["cfg"] = _cfg({"base": p["base"], "models": p["models"] + p["models"][:1]}, "dare_ties")
    p["out"] = tmp_path / "out"
    return p


def nothing_left(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if out.name in p.name]


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_nan_names_tensor_and_file(tiny, method):
    tiny["cfg"]["merge_method"] = method
    t = load_dir(tiny["models"][1])
    t[Q] = t[Q].clone()
    t[Q][2, 3] = float("inf")
    for f in tiny["models"][1].glob("*.safetensors*"):
        f.unlink()
    save_checkpoint(tiny["models"][1], t, shards=2)
    with pytest.raises(CheckpointError, match=r"model 1 for tensor '.*q_proj.weight' contains "
                                              r"1 NaN/Inf.*model_1/model-"):
        native.merge(tiny["cfg"], tiny["out"])
    nothing_left(tiny["out"])


def test_truncated_file_is_caught_before_reading(tiny):
    f = sorted(tiny["models"][0].glob("*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"run past the end"):
        native.merge(tiny["cfg"], tiny["out"])
    nothing_left(tiny["out"])


def test_disk_full_and_interrupt_leave_nothing(tiny, monkeypatch):
    from fastmerge.output.writer import ShardWriter
    real = fail_writes_after(monkeypatch, 3)
    with pytest.raises(OutputError, match=r"disk full while writing"):
        native.merge(tiny["cfg"], tiny["out"], shard_size="10KB")
    nothing_left(tiny["out"])
    monkeypatch.setattr(ShardWriter, "pwrite", staticmethod(real))

    from fastmerge.pipeline.core_kernels import CoreKernels
    seen = {"n": 0}
    merge_chunk = CoreKernels.merge

    def interrupt(self, *a):
        seen["n"] += 1
        if seen["n"] == 2:
            raise KeyboardInterrupt
        return merge_chunk(self, *a)
    monkeypatch.setattr(CoreKernels, "merge", interrupt)
    with pytest.raises(KeyboardInterrupt):
        native.merge(tiny["cfg"], tiny["out"])
    nothing_left(tiny["out"])


def test_existing_output_needs_overwrite(tiny):
    tiny["out"].mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        native.merge(tiny["cfg"], tiny["out"])
    res = native.merge(tiny["cfg"], tiny["out"], overwrite=True)
    assert (res.output_dir / "model.safetensors.index.json").exists()


def test_dare_merge_under_a_small_budget(tiny, tmp_path):
    """A DARE merge under a 40 MiB budget writes what an unbounded one writes."""
    small = native.merge(tiny["cfg"], tmp_path / "small", memory_budget="40MiB")
    same_dirs(small.output_dir, native.merge(tiny["cfg"], tmp_path / "big").output_dir)
