""".bin inputs (pytorch_model.bin, sharded with an index, the legacy format): the same merge
as from safetensors, byte for byte, on both pipelines; pickles that need more than tensors are
refused without running; paths stay inside the model directory; the budget holds."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_util import (
    REPO,
    assert_rss_within,
    native_rss_inputs,
    state_dict_of,
    write_bin,
    write_config,
    write_safetensors,
)

import fastmerge
from fastmerge.checkpoint.bin_file import BinCheckpoint
from fastmerge.checkpoint.safetensors_file import CheckpointError
from fastmerge.checkpoint.sources import open_model
from fastmerge.pipeline import load_config, native


def _sds(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g).bfloat16(),
            "model.layers.0.mlp.up_proj.weight": torch.randn(48, 32, generator=g).bfloat16(),
            "model.layers.0.input_layernorm.weight": torch.randn(32, generator=g).float(),
            "model.pos_ids": torch.arange(16)}
    out = [base]
    for _ in range(n - 1):
        out.append({k: v + (0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
                    if v.is_floating_point() else v for k, v in base.items()})
    return out


def _merge(cfg, out, path):
    if path == "native":
        return native.merge_natively(load_config(str(cfg)), out)
    return fastmerge.merge_checkpoints(str(cfg), out, backend="torch")


@pytest.mark.parametrize("path", ["engine", "native"])
def test_bin_inputs_merge_like_safetensors(tmp_path, path):
    """A .bin base, a sharded .bin model and a safetensors model: the output is the
    all-safetensors merge's, byte for byte (and always safetensors)."""
    if path == "native" and native._core() is None:
        pytest.skip("fastmerge._core is not built")
    sds = _sds()
    st = [write_safetensors(tmp_path / f"st{i}", sd) for i, sd in enumerate(sds)]
    mixed = [write_bin(tmp_path / "b0", sds[0]), write_bin(tmp_path / "b1", sds[1], shards=2),
             st[2]]
    want = _merge(write_config(tmp_path / "a.yml", st[0], st[1:], "ties", parameters={
        "density": 0.5}), tmp_path / "want", path)
    got = _merge(write_config(tmp_path / "b.yml", mixed[0], mixed[1:], "ties", parameters={
        "density": 0.5}), tmp_path / "got", path)
    w, g = state_dict_of(want.output_dir), state_dict_of(got.output_dir)
    assert w.keys() == g.keys() and all(torch.equal(w[k], g[k]) for k in w)
    assert not list(got.output_dir.glob("*.bin"))


def test_legacy_format_and_non_contiguous_tensors(tmp_path):
    """The legacy (non-zip) format loads whole; a tensor saved as a transposed view reads as
    its values in row-major order, chunk by chunk."""
    t = torch.randn(8, 6)
    sd = {"a": t.T, "b": torch.randn(5).bfloat16()}
    for legacy in (False, True):
        ck = BinCheckpoint(write_bin(tmp_path / f"m{legacy}", sd, legacy=legacy))
        assert ck.files["pytorch_model.bin"].mapped is not legacy
        assert torch.equal(ck.read("a"), t.T.reshape(-1))
        assert torch.equal(ck.read("a", 7, 20), t.T.reshape(-1)[7:20])
        assert bytes(ck.view("b", 1, 3)) == sd["b"][1:3].view(torch.uint8).numpy().tobytes()
        assert ck.info("a").shape == (6, 8) and ck.info("b").st == "BF16"


class _Boom:
    """Unpickling this would create a marker file: proof that pickled code ran."""
    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, capsys):
    _Boom.marker = str(tmp_path / "ran")
    sds = _sds(2)
    base = write_safetensors(tmp_path / "base", sds[0])
    bad = write_bin(tmp_path / "bad", {**sds[1], "x": _Boom()})
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused: the pickle needs "
                                              r"more than tensors \(Unsupported global"):
        open_model(str(bad))
    cfg = write_config(tmp_path / "c.yml", base, [bad])
    from fastmerge.cli import main
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and str(bad) in err[0]
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_bin_files_outside_the_model_directory_are_refused(tmp_path):
    sds = _sds(2)
    d = write_bin(tmp_path / "m", sds[0], shards=2)
    outside = write_bin(tmp_path / "elsewhere", sds[1])
    (d / "pytorch_model-00001-of-00002.bin").unlink()
    (d / "pytorch_model-00001-of-00002.bin").symlink_to(outside / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="outside the model directory"):
        open_model(str(d))
    idx = d / "pytorch_model.bin.index.json"
    idx.write_text(idx.read_text().replace("pytorch_model-00002", "../elsewhere/pytorch_model"))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        open_model(str(d))


def test_a_bin_holding_something_else_is_one_line(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="entry 'state_dict' is a dict, not a tensor"):
        open_model(str(d))
    torch.save([torch.ones(2)], d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        open_model(str(d))
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    with open(d / "pytorch_model.bin", "r+b") as f:   # truncated
        f.truncate(200)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        open_model(str(d))


def test_torch_is_imported_only_for_a_bin_input(tmp_path):
    sds = _sds(2)
    st = write_safetensors(tmp_path / "st", sds[0])
    b = write_bin(tmp_path / "b", sds[1])
    code = ("import sys; from fastmerge.checkpoint.sources import open_model; "
            "open_model(sys.argv[1]); print('torch' in sys.modules)")
    env = {"PYTHONPATH": str(REPO)}
    seen = [subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True,
                           text=True, env=env, check=True).stdout.strip() for p in (st, b)]
    assert seen == ["False", "True"]


@pytest.mark.slow
def test_peak_rss_stays_under_the_budget_with_bin_inputs(tmp_path):
    """Mapped .bin inputs several times the budget: each chunk's pages are dropped once
    copied, so the merge's RSS stays within the budget (fastmerge merge's path)."""
    budget, _, base = native_rss_inputs()
    models = [{k: v + 0.01 for k, v in base.items()} for _ in range(2)]
    b = write_bin(tmp_path / "base", base, shards=2)
    ms = [write_bin(tmp_path / f"m{i}", sd) for i, sd in enumerate(models)]
    assert 3 * 6 * 2816 * 1024 * 2 > 2.5 * budget
    cfg = write_config(tmp_path / "c.yml", b, ms)
    small = _sds(3)
    warm = write_config(tmp_path / "w.yml", write_bin(tmp_path / "wb", small[0]),
                        [write_bin(tmp_path / f"w{i}", sd) for i, sd in enumerate(small[1:])])
    assert_rss_within(tmp_path, cfg, warm, budget)
