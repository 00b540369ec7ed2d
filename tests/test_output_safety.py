"""The output side of docs/guarantees.md in one process: the atomic output directory never
replaces or deletes what the run did not create, --overwrite replaces only the directory that
was there at the start, leftovers of dead runs go and live runs' stay, created parents are
removed on failure, an OUT_DIR among the inputs is refused, extract-second-moments never
overwrites by surprise, and config.json carries the output dtype under every dtype key.
(tests/test_signals.py does the same through real processes and signals.)"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_util import index_of

import fastmerge
from fastmerge.checkpoint import libc
from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.output import writer
from fastmerge.output.writer import (
    LOCK_NAME,
    AtomicDirectory,
    Interrupted,
    copy_model_files,
    output_dir_at_start,
    remove_dead_leftovers,
    rename_noreplace,
)
from fastmerge.pipeline import ConfigError, OutputError, load_config
from fastmerge.pipeline.native import merge_natively


@pytest.fixture(params=["renameat2", "fallback"])
def renames(request, monkeypatch):
    """Every test runs with Linux's renameat2 and with the portable fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(libc, "_renameat2", None)
    elif libc._renameat2 is None:
        pytest.skip("no renameat2 in this C library")
    return request.param


def build(adir: AtomicDirectory, text="merged") -> None:
    (adir.tmp / "model.safetensors").write_text(text)


def kept_path(exc) -> Path:
    return Path(str(exc.value).split("output is in ", 1)[1].split("; ")[0])


def siblings(path: Path) -> list:
    return sorted(p.name for p in path.parent.iterdir())


# ----------------------------------------------------------------------------- the final rename
def test_commit_places_the_output(tmp_path, renames):
    out = tmp_path / "out"
    with AtomicDirectory(out) as adir:
        build(adir)
        assert adir.commit() == out
    assert (out / "model.safetensors").read_text() == "merged"
    assert siblings(out) == ["out"]              # no temporary, no lock file left
    assert os.listdir(out) == ["model.safetensors"]


def test_out_dir_appearing_meanwhile_is_left_untouched(tmp_path, renames):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while this merge ran") as exc:
        with AtomicDirectory(out) as adir:
            build(adir)
            out.mkdir()                           # a user (or a faster run) made it
            (out / "mine.txt").write_text("user")
            adir.commit()
    assert os.listdir(out) == ["mine.txt"]
    kept = kept_path(exc)
    assert kept.parent == tmp_path and kept.name.startswith(f"out.fastmerge-{os.getpid()}-")
    assert (kept / "model.safetensors").read_text() == "merged"
    assert siblings(out) == sorted(["out", kept.name])
    assert "[Errno" not in str(exc.value)


def test_an_empty_out_dir_appearing_meanwhile_is_not_replaced(tmp_path, renames):
    # a plain rename(2) replaces an empty directory: the commit must not
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared"):
        with AtomicDirectory(out) as adir:
            build(adir)
            out.mkdir()
            ino = out.stat().st_ino
            adir.commit()
    assert out.stat().st_ino == ino and os.listdir(out) == []


def test_two_directories_for_one_target_exactly_one_wins(tmp_path, renames):
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    a, b = AtomicDirectory(out), AtomicDirectory(out)   # b's start left a's temporary alone
    assert a.tmp.exists() and b.tmp.exists()
    build(a, "a")
    build(b, "b")
    with a:
        a.commit()
    with pytest.raises(OutputError, match="appeared") as exc, b:
        b.commit()
    assert (out / "model.safetensors").read_text() == "a"
    assert (kept_path(exc) / "model.safetensors").read_text() == "b"
    assert signal.getsignal(signal.SIGTERM) is before   # given back once both are closed


def test_overwrite_replaces_the_directory_of_the_start(tmp_path, renames):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with AtomicDirectory(output_dir_at_start(out), overwrite=True) as adir:
        build(adir)
        adir.commit()
    assert os.listdir(out) == ["model.safetensors"]
    assert siblings(out) == ["out"]


def test_overwrite_never_replaces_a_directory_swapped_in_meanwhile(tmp_path, renames):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="no longer the directory --overwrite") as exc:
        with AtomicDirectory(output_dir_at_start(out), overwrite=True) as adir:
            build(adir)
            out.rename(tmp_path / "moved")        # kept alive: its inode cannot be reused
            out.mkdir()
            (out / "new.txt").write_text("new")
            adir.commit()
    assert os.listdir(out) == ["new.txt"]
    assert os.listdir(tmp_path / "moved") == ["old.txt"]
    assert (kept_path(exc) / "model.safetensors").read_text() == "merged"


def test_overwrite_of_a_directory_removed_meanwhile_places_the_output(tmp_path, renames):
    out = tmp_path / "out"
    out.mkdir()
    with AtomicDirectory(out, overwrite=True) as adir:
        build(adir)
        out.rmdir()
        adir.commit()
    assert os.listdir(out) == ["model.safetensors"]


def test_overwrite_of_a_directory_replaced_before_the_output_opens(tmp_path):
    # the identity is taken when the merge starts (merge_settings), not when OUT opens
    out = tmp_path / "out"
    out.mkdir()
    start = output_dir_at_start(out)
    out.rename(tmp_path / "moved")
    out.mkdir()
    with pytest.raises(OutputError, match="replaced after this merge started"):
        AtomicDirectory(start, overwrite=True)
    assert siblings(out) == ["moved", "out"]
    # and one that did not exist at the start is not replaced either
    start = output_dir_at_start(tmp_path / "later")
    (tmp_path / "later").mkdir()
    with pytest.raises(OutputError, match="created or replaced after this merge started"):
        AtomicDirectory(start, overwrite=True)


def test_rename_noreplace_for_files(tmp_path, renames):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_text("a")
    dst.write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert src.read_text() == "a" and dst.read_text() == "b"
    dst.unlink()
    rename_noreplace(src, dst)
    assert not src.exists() and dst.read_text() == "a"


# ----------------------------------------------------------------------------- failures
def test_failure_removes_the_temporary_and_the_parents_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), AtomicDirectory(out) as adir:
        build(adir)
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_failure_keeps_a_created_parent_that_someone_else_uses(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), AtomicDirectory(out):
        (tmp_path / "a" / "other.txt").write_text("x")
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path / "a")) == ["other.txt"]


def test_merge_failure_leaves_no_parent_directory(tmp_path, monkeypatch):
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=1, hidden=32, inter=48,
                                   vocab=64, shards=1, only=("q_proj",))
    cfg = {"merge_method": "ties", "base_model": str(p["base"]),
           "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}}
                      for m in p["models"]]}
    from fastmerge.output.writer import ShardWriter

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ShardWriter, "pwrite", staticmethod(full))
    with pytest.raises(OutputError, match="disk full"):
        merge_natively(load_config(cfg), tmp_path / "new" / "deeper" / "out")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def _fake_fallocate(err):
    def fallocate(fd, mode, offset, length):
        import ctypes
        ctypes.set_errno(err)
        return -1
    return fallocate


def test_a_disk_too_small_for_the_shards_fails_at_the_start(tmp_path, monkeypatch):
    """The shards' blocks are reserved when they are opened: fallocate's ENOSPC is the one-line
    disk-full error, before any tensor is merged, and nothing is left behind."""
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=1, hidden=32, inter=48,
                                   vocab=64, shards=1, only=("q_proj",))
    cfg = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}}
                                                for m in p["models"]]}
    monkeypatch.setattr(writer, "_fallocate", _fake_fallocate(errno.ENOSPC))
    with pytest.raises(OutputError, match="disk full"):
        merge_natively(load_config(cfg), tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_a_file_system_without_fallocate_writes_the_same_shards(tmp_path, monkeypatch):
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=1, hidden=32, inter=48,
                                   vocab=64, shards=1, only=("q_proj",))
    cfg = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}}
                                                for m in p["models"]]}
    merge_natively(load_config(cfg), tmp_path / "a")
    monkeypatch.setattr(writer, "_fallocate", _fake_fallocate(errno.EOPNOTSUPP))
    merge_natively(load_config(cfg), tmp_path / "b")
    for f in sorted(os.listdir(tmp_path / "a")):
        if f.endswith(".safetensors"):
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_termination_signal_unwinds_and_handlers_are_restored(tmp_path, sig):
    signum = getattr(signal, sig)
    before = signal.getsignal(signum)
    out = tmp_path / "out"
    with pytest.raises(Interrupted) as exc, AtomicDirectory(out) as adir:
        build(adir)
        os.kill(os.getpid(), signum)
        for _ in range(1000):                     # the handler runs between bytecodes
            pass
    assert exc.value.exit_status == 128 + signum
    assert isinstance(exc.value, KeyboardInterrupt)
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signum) is before


def test_an_ignored_signal_stays_ignored(tmp_path):
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)     # as under nohup
    try:
        with AtomicDirectory(tmp_path / "out") as adir:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            build(adir)
            adir.commit()
        assert (tmp_path / "out" / "model.safetensors").exists()
    finally:
        signal.signal(signal.SIGHUP, before)


# ----------------------------------------------------------------------------- leftovers
def _leftover(parent: Path, name: str, pid: int, lock: bool) -> Path:
    d = parent / f".{name}.fastmerge-tmp-{pid}-{os.urandom(4).hex()}"
    d.mkdir()
    (d / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    if lock:
        (d / LOCK_NAME).write_text("")
    return d


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(writer.fcntl is None, reason="needs flock")
def test_leftovers_of_dead_runs_go_and_live_runs_stay(tmp_path):
    import fcntl
    dead = _leftover(tmp_path, "out", _dead_pid(), lock=True)            # lock free: dead
    old_style = _leftover(tmp_path, "out", _dead_pid(), lock=False)      # no lock, pid gone
    live = _leftover(tmp_path, "out", os.getppid(), lock=True)
    fd = os.open(live / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)                                       # held: a live run
    starting = _leftover(tmp_path, "out", os.getppid(), lock=False)    # no lock yet, pid alive
    other = _leftover(tmp_path, "other", _dead_pid(), lock=True)        # another target's
    user = tmp_path / ".out.fastmerge-mine"                              # not a temporary name
    user.mkdir()
    try:
        removed = remove_dead_leftovers(tmp_path / "out")
        assert sorted(removed) == sorted([dead, old_style])
        assert live.exists() and starting.exists() and other.exists() and user.exists()
        # a run's start does the same
        with AtomicDirectory(tmp_path / "out") as adir:
            build(adir)
            adir.commit()
        assert live.exists() and starting.exists()
    finally:
        os.close(fd)
    assert remove_dead_leftovers(tmp_path / "out") == [live]   # its owner is gone now


@pytest.mark.skipif(writer.fcntl is None, reason="needs flock")
def test_the_temporary_is_locked_while_the_run_lives(tmp_path):
    import fcntl
    with AtomicDirectory(tmp_path / "out") as adir:
        name = adir.tmp.name
        assert name.startswith(f".out.fastmerge-tmp-{os.getpid()}-")
        fd = os.open(adir.tmp / LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        build(adir)
        adir.commit()


# ----------------------------------------------------------------------------- OUT among inputs
@pytest.fixture
def inputs(tmp_path):
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=1, hidden=32, inter=48,
                                   vocab=64, shards=1, only=("q_proj",))
    moments = tmp_path / "moments"
    moments.mkdir()
    p["cfg"] = {"merge_method": "ties", "base_model": str(p["base"]),
                "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}}
                           for m in p["models"]]}
    p["moments_dir"] = moments
    return p


def _merge_api(cfg, out):
    return fastmerge.merge_checkpoints(cfg, out, backend="torch", overwrite=True)


def _merge_native(cfg, out):
    return merge_natively(load_config(cfg), out, overwrite=True)


@pytest.mark.parametrize("merge", [_merge_api, _merge_native], ids=["engine", "native"])
@pytest.mark.parametrize("where", ["base", "model", "inside_model", "parent", "moments"])
def test_out_dir_among_the_inputs_is_refused_before_anything(inputs, tmp_path, merge, where):
    cfg = json.loads(json.dumps(inputs["cfg"]))
    if where == "moments":
        cfg["merge_method"] = "ota"
        for m, f in zip(cfg["models"], ("a.safetensors", "b.safetensors"), strict=True):
            (inputs["moments_dir"] / f).write_bytes(b"not read")
            m["preconditioner_path"] = str(inputs["moments_dir"] / f)
    out = {"base": inputs["base"], "model": inputs["models"][1],
           "inside_model": inputs["models"][0] / "sub" / "out", "parent": tmp_path / "in",
           "moments": inputs["moments_dir"]}[where]
    how = {"base": "is input base_model", "model": r"is input models\[1\]",
           "inside_model": r"lies inside input models\[0\]", "parent": "contains input",
           "moments": r"contains input models\[0\].preconditioner_path"}[where]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=how):
        merge(cfg, out)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_out_dir_through_a_symlink_into_an_input_is_refused(inputs, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(inputs["models"][0])
    with pytest.raises(ConfigError, match=r"is input models\[0\]"):
        _merge_native(inputs["cfg"], link)
    with pytest.raises(ConfigError, match=r"lies inside input models\[0\]"):
        _merge_native(inputs["cfg"], link / "x")
    assert list(inputs["models"][0].glob("*.safetensors"))


def test_out_dir_holding_the_config_file_is_refused(inputs, tmp_path):
    cfg_dir = tmp_path / "project"
    cfg_dir.mkdir()
    path = cfg_dir / "merge.yml"
    import yaml
    path.write_text(yaml.safe_dump(inputs["cfg"]))
    with pytest.raises(ConfigError, match="config file's directory"):
        merge_natively(load_config(path), cfg_dir, overwrite=True)
    assert path.exists()
    merge_natively(load_config(path), cfg_dir / "out")        # beside the config: fine
    assert index_of(cfg_dir / "out")


# ----------------------------------------------------------------------------- second moments
def _optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    names = tmp_path / "names.txt"
    names.write_text("weight\nbias\n")
    return path, names


def test_extract_second_moments_refuses_an_existing_output(tmp_path, capsys):
    from fastmerge.cli import main
    opt, names = _optimizer(tmp_path)
    out = tmp_path / "v.safetensors"
    out.write_text("precious")
    args = ["extract-second-moments", str(opt), "--model", str(names), "--out", str(out)]
    assert main(args) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().out + \
        capsys.readouterr().err
    assert out.read_text() == "precious"
    assert main(args + ["--overwrite"]) == 0
    from safetensors.torch import load_file
    assert set(load_file(out)) == {"weight", "bias"}
    assert sorted(os.listdir(tmp_path)) == ["names.txt", "optimizer.pt", "v.safetensors"]


def test_extract_second_moments_never_writes_over_its_input(tmp_path):
    from fastmerge.cli.second_moments import extract_exp_avg_sq
    opt, names = _optimizer(tmp_path)
    with pytest.raises(ValueError, match="is the input"):
        extract_exp_avg_sq(opt, names, opt, overwrite=True)
    assert torch.load(opt, weights_only=True)["state"]


def test_extract_second_moments_keeps_a_file_that_appears_meanwhile(tmp_path, monkeypatch):
    from fastmerge.cli import second_moments
    opt, names = _optimizer(tmp_path)
    out = tmp_path / "v.safetensors"
    real = second_moments.finite_non_negative

    def appear(v):                                  # runs after the existence check
        if not out.exists():
            out.write_text("theirs")
        return real(v)
    monkeypatch.setattr(second_moments, "finite_non_negative", appear)
    with pytest.raises(FileExistsError, match="appeared while extracting"):
        second_moments.extract_exp_avg_sq(opt, names, out)
    assert out.read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["names.txt", "optimizer.pt", "v.safetensors"]


# ----------------------------------------------------------------------------- config.json dtype
@pytest.mark.parametrize("keys", [("torch_dtype",), ("dtype",), ("torch_dtype", "dtype"), ()])
def test_config_json_gets_the_output_dtype_under_the_base_keys(tmp_path, keys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    cfg = {"model_type": "llama", **{k: "float32" for k in keys},
           "text_config": {k: "float32" for k in keys}}
    (src / "config.json").write_text(json.dumps(cfg))
    copy_model_files(src, dst, torch.bfloat16)
    got = json.loads((dst / "config.json").read_text())
    for k in keys or ("torch_dtype",):
        assert got[k] == "bfloat16", got
    for k in keys:
        assert got["text_config"][k] == "bfloat16", got
    assert set(got) == set(cfg) | ({"torch_dtype"} if not keys else set())


def test_merged_config_json_loads_as_the_output_dtype(inputs, tmp_path):
    base_cfg = inputs["base"] / "config.json"
    cfg = json.loads(base_cfg.read_text())
    cfg["torch_dtype"], cfg["dtype"] = "float32", "float32"
    base_cfg.write_text(json.dumps(cfg))
    merge_cfg = dict(inputs["cfg"], dtype="float16")
    _merge_native(merge_cfg, tmp_path / "out")
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    assert got["torch_dtype"] == got["dtype"] == "float16"
