"""Bad input and failures: clear errors naming file and tensor, and nothing left behind."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from engine_util import fail_writes_after, load_dir
from safetensors.torch import save_file

import fastmerge
from fastmerge.cli.demo import make_synthetic_checkpoints, save_checkpoint
from fastmerge.pipeline import CheckpointError, ConfigError, OutputError


@pytest.fixture
def tiny(tmp_path):
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=2, hidden=32, inter=48,
                                   vocab=64, shards=2, only=("q_proj",))
    p["cfg"] = {"merge_method": "ties", "base_model": str(p["base"]),
                "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}}
                           for m in p["models"]]}
    p["out"] = tmp_path / "out"
    return p


def nothing_left(out: Path):
    """No output directory and no temporary directory beside it."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if out.name in p.name], \
        list(out.parent.iterdir())


def run(tiny, **kw):
    return fastmerge.merge_checkpoints(tiny["cfg"], tiny["out"], backend="torch", **kw)


def _shard_of(model_dir: Path, name: str) -> Path:
    idx = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return model_dir / idx["weight_map"][name]


def _rewrite(model_dir: Path, edit):
    tensors = load_dir(model_dir)
    edit(tensors)
    for f in model_dir.glob("*.safetensors*"):
        f.unlink()
    save_checkpoint(model_dir, tensors, shards=2)


def test_missing_tensor_names_model_and_tensor(tiny):
    _rewrite(tiny["models"][1], lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model_1.*lacks tensor "
                                              r"'model.layers.1.self_attn.q_proj.weight'"):
        run(tiny)
    nothing_left(tiny["out"])


def test_extra_tensor_names_file_and_tensor(tiny):
    _rewrite(tiny["models"][0], lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"model_0/model-0000\d-of-00002.safetensors: "
                                              r"tensor 'model.extra.weight' is not in the base"):
        run(tiny)
    nothing_left(tiny["out"])


def test_shape_and_dtype_mismatch(tiny):
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(tiny["models"][0], lambda t: t.update({name: torch.zeros(32, 31).bfloat16()}))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight'"
                                              r": shape \[32, 31\] in .*model_0"):
        run(tiny)
    _rewrite(tiny["models"][0], lambda t: t.update({name: torch.zeros(32, 32, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"dtype torch.int32 in .*model_0.* does not match"):
        run(tiny)
    nothing_left(tiny["out"])


@pytest.mark.parametrize("damage", ["bad_json", "header_too_long", "truncated", "bad_offsets",
                                    "empty"])
def test_corrupt_safetensors_is_caught_before_reading(tiny, damage):
    f = _shard_of(tiny["models"][1], "model.embed_tokens.weight")
    raw = f.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    if damage == "bad_json":
        raw = raw[:8] + b"x" + raw[9:]
    elif damage == "header_too_long":
        raw = struct.pack("<Q", len(raw) + 10) + raw[8:]
    elif damage == "truncated":
        raw = raw[:-100]
    elif damage == "bad_offsets":
        e = header["model.embed_tokens.weight"]
        e["data_offsets"] = [e["data_offsets"][0], e["data_offsets"][1] + 8]
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        raw = struct.pack("<Q", len(h)) + h + raw[8 + hlen:]
    elif damage == "empty":
        raw = b"\x01\x02"
    f.write_bytes(raw)
    with pytest.raises(CheckpointError, match=str(f).replace(".", r"\.")):
        run(tiny)
    nothing_left(tiny["out"])


def test_config_naming_a_missing_path(tiny):
    tiny["cfg"]["models"][1]["model"] = str(tiny["out"].parent / "nope")
    with pytest.raises(CheckpointError, match=r"models\[1\].*nope"):
        run(tiny)
    tiny["cfg"]["models"][1]["model"] = "./relative/nope"
    with pytest.raises(CheckpointError, match="no such directory"):
        run(tiny)
    nothing_left(tiny["out"])


def test_nan_in_weights_names_tensor_and_file(tiny):
    name = "model.layers.1.self_attn.q_proj.weight"

    def poison(t):
        x = t[name].clone()
        x[3, 4] = float("nan")
        t[name] = x
    _rewrite(tiny["models"][1], poison)
    with pytest.raises(CheckpointError, match=r"model 1 for tensor "
                                              r"'model.layers.1.self_attn.q_proj.weight'.*NaN.*"
                                              r"model_1/model-"):
        run(tiny)
    nothing_left(tiny["out"])


def test_disk_full_while_writing_leaves_nothing(tiny, monkeypatch):
    fail_writes_after(monkeypatch, 4)
    with pytest.raises(OutputError, match=r"disk full while writing .*model-0000\d-of"):
        run(tiny, shard_size="10KB")
    nothing_left(tiny["out"])


def test_keyboard_interrupt_mid_merge_leaves_nothing(tiny, monkeypatch):
    from fastmerge.pipeline.torch_kernels import TorchKernels
    calls = {"n": 0}
    real = TorchKernels.merge

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(TorchKernels, "merge", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tiny)
    nothing_left(tiny["out"])


def test_existing_output_needs_overwrite(tiny):
    tiny["out"].mkdir()
    (tiny["out"] / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(tiny)
    assert (tiny["out"] / "old.txt").exists()
    run(tiny, overwrite=True)
    assert not (tiny["out"] / "old.txt").exists()
    assert (tiny["out"] / "model.safetensors.index.json").exists()
    # and a failing overwrite keeps the old output
    (tiny["out"] / "keep.txt").write_text("x")
    tiny["cfg"]["merge_method"] = "slerp"
    with pytest.raises(ConfigError):
        run(tiny, overwrite=True)
    assert (tiny["out"] / "keep.txt").exists()


def test_curvature_method_needs_and_checks_second_moments(tiny, tmp_path):
    tiny["cfg"]["merge_method"] = "ota"
    with pytest.raises(ConfigError, match=r"preconditioner_path"):
        run(tiny)
    moments = {}
    for m in (tiny["base"],):
        for k, v in load_dir(m).items():
            moments[k] = torch.rand(v.shape)
    moments["model.layers.0.self_attn.q_proj.weight"] = torch.rand(3, 3)
    save_file(moments, str(tmp_path / "v.safetensors"))
    for e in tiny["cfg"]["models"]:
        e["preconditioner_path"] = str(tmp_path / "v.safetensors")
        e.pop("parameters")
    with pytest.raises(CheckpointError, match=r"v.safetensors, tensor "
                                              r"'model.layers.0.self_attn.q_proj.weight': second "
                                              r"moments have shape \[3, 3\]"):
        run(tiny)
    moments["model.layers.0.self_attn.q_proj.weight"] = -torch.rand(32, 32)
    save_file(moments, str(tmp_path / "v.safetensors"))
    with pytest.raises(CheckpointError, match=r"v.safetensors, tensor "
                                              r"'model.layers.0.self_attn.q_proj.weight': second "
                                              r"moments must be finite and non-negative"):
        run(tiny)
    del moments["model.layers.0.self_attn.q_proj.weight"]
    save_file(moments, str(tmp_path / "v.safetensors"))
    with pytest.raises(CheckpointError, match=r"no second moments for tensor "
                                              r"'model.layers.0.self_attn.q_proj.weight'"):
        run(tiny)
    nothing_left(tiny["out"])
