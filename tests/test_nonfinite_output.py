"""Finite inputs that overflow the output dtype: an error naming the tensor and nothing written,
in both pipelines (native and engine); allow_nonfinite writes them with a warning."""
from __future__ import annotations

import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fastmerge.cli import main
from fastmerge.output.report import NonFiniteOutput, NonFiniteOutputWarning, nonfinite_in
from fastmerge.pipeline import merge_checkpoints
from fastmerge.pipeline.native import merge_natively
from fastmerge.recipe.config import load_config

BIG = "model.layers.0.mlp.weight"


def checkpoints(root, value, dtype=torch.float32, bad_at=(5, 7)):
    """base = 0, two models = ``value`` at one element of BIG (1.0 elsewhere)."""
    paths = {}
    for name, v in (("base", 0.0), ("m0", value), ("m1", value)):
        w = torch.zeros(16, 32, dtype=dtype) if name == "base" else torch.ones(16, 32, dtype=dtype)
        w[bad_at] = v
        d = root / name
        d.mkdir()
        save_file({BIG: w, "model.norm.weight": torch.ones(32, dtype=dtype)},
                  str(d / "model.safetensors"))
        paths[name] = str(d)
    return paths


def config(tmp_path, paths, **extra):
    raw = {"merge_method": "task_arithmetic", "base_model": paths["base"],
           "models": [{"model": paths["m0"]}, {"model": paths["m1"]}], **extra}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("dtype,st", [(torch.bfloat16, "BF16"), (torch.float16, "F16"),
                                      (torch.float32, "F32")])
def test_nonfinite_in_matches_isfinite(dtype, st):
    info = torch.finfo(dtype)
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.eps] * 9,
                     dtype=dtype)
    assert nonfinite_in(x.view(torch.uint8).numpy(), st) is None
    for bad in (float("inf"), float("-inf"), float("nan"), -float("nan")):
        y = x.clone()
        y[[13, 40, 41]] = bad
        assert nonfinite_in(y.view(torch.uint8).numpy(), st) == (3, 13), bad
    assert nonfinite_in(b"", st) is None


@pytest.mark.parametrize("pipeline", ["native", "engine"])
@pytest.mark.parametrize("value,dtype,out", [
    (3e38, torch.float32, None),          # 6e38 overflows float32
    (3e38, torch.float32, "bfloat16"),    # and bfloat16
    (4e4, torch.float32, "float16"),      # 8e4 fits float32 but not float16
    (4e4, torch.float16, None),           # fp16 inputs, fp16 output
])
def test_overflow_stops_the_merge(tmp_path, pipeline, value, dtype, out):
    paths = checkpoints(tmp_path, value, dtype)
    cfg = load_config(str(config(tmp_path, paths, **({"dtype": out} if out else {}))))
    target = tmp_path / "out"
    run = merge_natively if pipeline == "native" else merge_checkpoints
    kw = {} if pipeline == "native" else {"backend": "torch"}
    with pytest.raises(NonFiniteOutput, match=rf"tensor '{BIG}'.* 1 NaN/Inf .*element "
                                              rf"{5 * 32 + 7}\b.*nothing was written"):
        run(cfg, target, **kw)
    assert not target.exists()
    # nothing left beside the inputs (the temporary output directory was removed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "c.yml", "m0", "m1"]


@pytest.mark.parametrize("pipeline", ["native", "engine"])
def test_first_bad_element_of_a_later_chunk(tmp_path, pipeline):
    paths = checkpoints(tmp_path, 3e38, bad_at=(12, 3))
    cfg = load_config(str(config(tmp_path, paths)))
    run = merge_natively if pipeline == "native" else merge_checkpoints
    kw = {} if pipeline == "native" else {"backend": "torch"}
    with pytest.raises(NonFiniteOutput, match=rf"among elements \[384, 416\), the first at "
                                              rf"element {12 * 32 + 3}\b"):
        run(cfg, tmp_path / "out", max_chunk_elems=32, **kw)


@pytest.mark.parametrize("pipeline", ["native", "engine"])
def test_allow_nonfinite_writes_with_a_warning(tmp_path, pipeline):
    paths = checkpoints(tmp_path, 3e38)
    cfg = load_config(str(config(tmp_path, paths)))
    run = merge_natively if pipeline == "native" else merge_checkpoints
    kw = {} if pipeline == "native" else {"backend": "torch"}
    with pytest.warns(NonFiniteOutputWarning, match=BIG):
        res = run(cfg, tmp_path / "out", allow_nonfinite=True, **kw)
    assert res.nonfinite == {BIG: 1}
    got = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))[BIG]
    assert torch.isinf(got[5, 7]) and torch.isfinite(got).sum() == got.numel() - 1


def test_cli_error_and_allow_flag(tmp_path, capsys):
    paths = checkpoints(tmp_path, 3e38)
    cfg = config(tmp_path, paths)
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastmerge: error: tensor ") and BIG in err[0]
    assert not (tmp_path / "out").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet",
                     "--allow-nonfinite"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastmerge: warning: ") and BIG in err[0]
    assert (tmp_path / "out").is_dir()
