"""Reading inputs safely (issue 17): nothing read outside a model directory, headers refused
exactly where the safetensors library refuses them, every bad input one clear line."""
from __future__ import annotations

import json
import os
import re
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastmerge
from fastmerge.checkpoint import safetensors_file as checkpoint_io
from fastmerge.checkpoint.hub import resolve_model
from fastmerge.checkpoint.safetensors_file import Checkpoint, CheckpointError, SafetensorsFile
from fastmerge.cli.demo import save_checkpoint

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def raw_file(path: Path, header, data: bytes = b"\0" * 8) -> Path:
    """A safetensors file with ``header`` (a dict, or the JSON bytes as they are)."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def model(d: Path, tensors=None, shards=1) -> Path:
    tensors = tensors or {"a": torch.ones(2), "b": torch.arange(3.0)}
    save_checkpoint(d, tensors, shards=shards, tokenizer=False)
    return d


def index_of(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def write_index(d: Path, doc) -> Path:
    p = d / "model.safetensors.index.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture
def opened(monkeypatch):
    """Every path checkpoint_io opens, in order."""
    seen = []
    real = getattr(checkpoint_io, "open_regular", None)

    def spy(path, what):
        seen.append(Path(path))
        return real(path, what)
    monkeypatch.setattr(checkpoint_io, "open_regular", spy, raising=False)
    return seen


# ------------------------------------------------------------------ item 3: path traversal
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entry_outside_the_model_is_refused_before_opening(tmp_path, how, opened):
    d = model(tmp_path / "m", shards=2)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "x.safetensors"
    save_file({"a": torch.full((2,), 7.0)}, str(secret))
    idx = index_of(d)
    if how == "dotdot":
        entry = "../elsewhere/x.safetensors"
    elif how == "absolute":
        entry = str(secret)
    else:
        entry = "link.safetensors"
        (d / entry).symlink_to(secret)
    idx["weight_map"]["a"] = entry
    index = write_index(d, idx)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(d)
    msg = one_line(e)
    assert str(index) in msg and repr(entry) in msg and "outside the model directory" in msg
    assert str(d.resolve()) in msg
    assert all(p.resolve() != secret.resolve() for p in opened)


def test_glob_shard_symlinked_outside_is_refused(tmp_path, opened):
    d = tmp_path / "m"
    d.mkdir()
    secret = tmp_path / "secret.safetensors"
    save_file({"a": torch.ones(2)}, str(secret))
    (d / "model.safetensors").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the model directory") as e:
        Checkpoint(d)
    one_line(e)
    assert opened == []


def test_config_symlinked_outside_is_refused(tmp_path):
    d = model(tmp_path / "m")
    (tmp_path / "secret.txt").write_text("{}")
    (d / "config.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(CheckpointError, match=r"'config.json' resolves to .*outside"):
        Checkpoint(d)


def test_symlinks_inside_the_model_and_hub_cache_blobs_are_fine(tmp_path):
    # the Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(blobs / "0123abcd"))
    (snap / "model.safetensors").symlink_to(Path("../../blobs/0123abcd"))
    (blobs / "cfg").write_text('{"model_type": "llama"}')
    (snap / "config.json").symlink_to(Path("../../blobs/cfg"))
    assert Checkpoint(snap).names == ["a"]
    d = model(tmp_path / "m")
    (d / "sub").mkdir()
    (d / "model.safetensors").rename(d / "sub" / "real.safetensors")
    (d / "model.safetensors").symlink_to(Path("sub/real.safetensors"))
    assert sorted(Checkpoint(d).names) == ["a", "b"]


def test_merge_with_a_traversing_index_leaves_nothing(tmp_path):
    base, m1 = model(tmp_path / "base", shards=2), model(tmp_path / "m1", shards=2)
    idx = index_of(m1)
    idx["weight_map"]["a"] = "../base/" + idx["weight_map"]["a"]
    write_index(m1, idx)
    cfg = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1}},
                                                {"model": str(m1), "parameters": {"weight": 1}}]}
    with pytest.raises(CheckpointError, match="models\\[1\\]: .*outside the model directory"):
        fastmerge.merge_checkpoints(cfg, tmp_path / "out", backend="torch")
    assert not any("out" in p.name for p in tmp_path.iterdir())


# ------------------------------------------------------------- item 4: duplicate names
def test_duplicate_tensor_name_in_one_header_is_refused(tmp_path):
    p = raw_file(tmp_path / "d.safetensors",
                 b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                 b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
    with pytest.raises(CheckpointError, match=r"d\.safetensors, tensor 'w': tensor name appears "
                                              r"twice"):
        SafetensorsFile(p)


def test_tensor_in_two_shards_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "x.safetensors"))
    save_file({"a": torch.zeros(2)}, str(d / "y.safetensors"))
    with pytest.raises(CheckpointError, match=r"y\.safetensors, tensor 'a': also stored in "
                                              r".*x\.safetensors"):
        Checkpoint(d)


# ---------------------------------------------------------------- item 8: index errors
@pytest.mark.parametrize("doc, why", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": ["a"]}', "weight_map"),
    ('{"weight_map": {"a": 3}}', "mapped to 3, not a file name"),
    ('{"weight_map": {"a": null}}', "mapped to None"),
    ('{"weight_map": {"a": ""}}', "not a file name"),
    ('{"weight_map": {}}', "lists no tensors"),
    ('{"weight_map": {"a": "model.safetensors", "a": "model.safetensors"}}', "listed twice"),
    ('{"weight_map": {"a": "model.safetensors", "b": "nope.safetensors"}}',
     "names shard 'nope.safetensors' but .* does not exist"),
    ("[" * 100000 + "]" * 100000, "invalid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_bad_index_is_one_line_naming_it(tmp_path, doc, why):
    d = model(tmp_path / "m")
    p = d / "model.safetensors.index.json"
    p.write_bytes(doc if isinstance(doc, bytes) else doc.encode())
    with pytest.raises(CheckpointError) as e:
        Checkpoint(d)
    msg = one_line(e)
    assert msg.startswith(str(p)) and re.search(why, msg), msg


def test_index_and_shards_must_agree(tmp_path):
    d = model(tmp_path / "m", {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(4)},
              shards=2)
    idx = index_of(d)
    idx["weight_map"]["ghost"] = idx["weight_map"]["a"]
    write_index(d, idx)
    with pytest.raises(CheckpointError, match=r"tensor 'ghost' is mapped to .* does not hold"):
        Checkpoint(d)
    # a tensor a shard holds that the index does not list: refused (the index is the contract)
    del idx["weight_map"]["ghost"], idx["weight_map"]["b"]
    write_index(d, idx)
    with pytest.raises(CheckpointError, match=r"tensor 'b': not listed in .*index\.json"):
        Checkpoint(d)


def test_index_that_is_a_directory_or_fifo(tmp_path):
    d = model(tmp_path / "m")
    (d / "model.safetensors.index.json").mkdir()
    with pytest.raises(CheckpointError, match="index is not a regular file"):
        Checkpoint(d)
    (d / "model.safetensors.index.json").rmdir()
    os.mkfifo(d / "model.safetensors.index.json")
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked on a FIFO"))
    signal.alarm(10)
    try:
        with pytest.raises(CheckpointError, match="index is not a regular file"):
            Checkpoint(d)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------- item 10: long names, dangling symlinks
def test_long_tensor_names_are_read_and_errors_cut_them(tmp_path):
    long = "x" * 100_000
    p = tmp_path / "l.safetensors"
    save_file({long: torch.ones(2)}, str(p))
    assert torch.equal(SafetensorsFile(p).read(long), torch.ones(2))
    raw_file(p, {long: dict(F32_2, shape=[3])})
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(p)
    assert len(one_line(e)) < 400


def test_long_file_name_in_index(tmp_path):
    d = model(tmp_path / "m", shards=2)
    idx = index_of(d)
    idx["weight_map"]["a"] = "y" * 5000 + ".safetensors"
    write_index(d, idx)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(d)
    assert len(one_line(e)) < 600


def test_dangling_symlink_shard(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").symlink_to(d / "gone.safetensors")
    with pytest.raises(CheckpointError, match="symlink to .*gone.safetensors.* does not exist"):
        Checkpoint(d)


def test_model_reference_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="File name too long") as e:
        resolve_model("a" * 5000)
    assert len(one_line(e)) < 400
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a model directory"):
        resolve_model(str(f))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="symlink to .*nowhere.*does not exist"):
        resolve_model(str(tmp_path / "dangling"))
    with pytest.raises(CheckpointError, match="NUL"):
        resolve_model("a\0b")
    with pytest.raises(CheckpointError, match="is not a directory"):
        Checkpoint(f)


# ------------------------------------------------------------ item 14: header strictness
@pytest.mark.parametrize("header, data, why", [
    ({"a": F32_2, "b": dict(F32_2, data_offsets=[4, 12])}, 12, "overlap tensor 'a'"),
    ({"a": F32_2}, 12, "bytes 8..12 of the data follow the last tensor"),
    ({"a": dict(F32_2, data_offsets=[4, 12])}, 12, "leave bytes 0..4"),
    ({"__metadata__": {"k": 1}, "a": F32_2}, 8, "__metadata__ is not an object of strings"),
    ({"__metadata__": [], "a": F32_2}, 8, "__metadata__ is not an object of strings"),
    ({"a": dict(F32_2, shape=[2 ** 32, 2 ** 32, 2])}, 8, "overflows 64 bits"),
    ({"a": dict(F32_2, shape=[2 ** 63])}, 8, "overflows 64 bits in bytes"),
    ({"a": dict(F32_2, shape=[2 ** 64])}, 8, "bad shape"),
    ({"a": dict(F32_2, shape=[-2])}, 8, "bad shape"),
    ({"a": dict(F32_2, shape=[2.0])}, 8, "bad shape"),
    ({"a": dict(F32_2, dtype="f32")}, 8, "unknown dtype 'f32'"),
    ({"a": dict(F32_2, data_offsets=[0, 8, 8])}, 8, "bad data_offsets"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', 8, "bad data_offsets"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\0', 8, "not valid JSON"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', 8, "not valid JSON"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":"\\udc00"}}', 8, "surrogate"),
    (b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8,
     "field dtype appears twice"),
    (b'{"x":' + b"[" * 127 + b"]" * 127 + b"}", 0, "nested deeper than 127"),
    (b'{"x":' + b"[" * 50000 + b"]" * 50000 + b"}", 0, "nested deeper than 127"),
    (b'{"a\xff":{}}', 8, "not valid UTF-8"),
])
def test_header_refused_like_the_safetensors_library(tmp_path, header, data, why):
    from safetensors import safe_open
    p = raw_file(tmp_path / "h.safetensors", header, b"\0" * data)
    with pytest.raises(Exception):  # the library refuses it too
        with safe_open(str(p), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(p)
    assert why in one_line(e)


def test_header_length_over_the_library_limit(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(CheckpointError, match="over the format's limit of 100000000"):
        SafetensorsFile(p)


@pytest.mark.parametrize("header", [
    b' \n{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":[1,{"y":2}]}}\t ',
    b'{"__metadata__":null,"a":["F32",[2],[0,8]]}',
    b'{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}',
    b'{"__metadata__":{"k":"v","k":"w"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 125 + b"]" * 125
    + b"}}",
])
def test_header_accepted_like_the_safetensors_library(tmp_path, header):
    from safetensors import safe_open
    p = raw_file(tmp_path / "ok.safetensors", header, struct.pack("<2f", 1.5, -2.0))
    with safe_open(str(p), framework="pt") as f:
        want = f.get_tensor("a")
    assert torch.equal(SafetensorsFile(p).read("a"), want)


def test_unsupported_dtype_names_file_and_tensor(tmp_path):
    p = raw_file(tmp_path / "u.safetensors",
                 {"s": {"dtype": "F8_E8M0", "shape": [8], "data_offsets": [0, 8]}})
    with pytest.raises(CheckpointError, match=r"u\.safetensors, tensor 's': unsupported dtype "
                                              r"F8_E8M0"):
        SafetensorsFile(p)


# ------------------------------------------------------------ item 15: other inputs
def test_config_json_that_is_not_an_object(tmp_path):
    d = model(tmp_path / "m")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: not a JSON object"):
        Checkpoint(d)
    (d / "config.json").write_text("[" * 100000)
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        Checkpoint(d)


def test_shard_that_is_a_directory_or_fifo(tmp_path):
    d = tmp_path / "m"
    (d / "model.safetensors").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="safetensors file is not a regular file"):
        Checkpoint(d)
    (d / "model.safetensors").rmdir()
    os.mkfifo(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="safetensors file is not a regular file"):
        Checkpoint(d)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_shard(tmp_path):
    d = model(tmp_path / "m")
    (d / "model.safetensors").chmod(0)
    with pytest.raises(CheckpointError, match="cannot open the safetensors file .*Permission"):
        Checkpoint(d)


class _Boom:
    """Unpickling this would create a marker file: proof that pickled code ran."""
    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_never_run_code(tmp_path):
    from fastmerge.cli.second_moments import load_optimizer_state
    _Boom.marker = str(tmp_path / "ran")
    d = tmp_path / "m"
    d.mkdir()
    torch.save({"w": _Boom()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"reads \*\.safetensors and pytorch_model\*\.bin"):
        Checkpoint(d)
    from fastmerge.checkpoint.sources import open_model
    with pytest.raises(CheckpointError, match="refused: the pickle needs more than tensors"):
        open_model(str(d))
    torch.save({"state": {0: _Boom()}, "param_groups": []}, tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_optimizer_state(tmp_path / "optimizer.pt")
    assert not (tmp_path / "ran").exists()
