"""The CLI contract: every error is one line ``fastmerge: error: ...`` naming the file, tensor or
parameter; exit status 2 for usage errors, 1 for failures; --debug / FASTMERGE_DEBUG=1 show
the traceback; an unexpected exception says it is an internal error."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from fastmerge.cli import main


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    g = torch.Generator().manual_seed(0)
    paths = {}
    for name in ("base", "m0", "m1"):
        d = root / name
        d.mkdir()
        save_file({f"model.layers.{i}.mlp.weight": torch.randn(64, 64, generator=g)
                   .to(torch.bfloat16) for i in range(2)}, str(d / "model.safetensors"))
        paths[name] = str(d)
    return paths


def write_config(tmp_path, ckpts, method="task_arithmetic", **params):
    raw = {"merge_method": method, "base_model": ckpts["base"],
           "models": [{"model": ckpts["m0"], "parameters": {"weight": 0.5, **params}},
                      {"model": ckpts["m1"], "parameters": {"weight": 0.5, **params}}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fastmerge: error: "), err[0]
    return err[0]


@pytest.mark.parametrize("option", ["--memory-budget", "--shard-size"])
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e400", "abc", "-inf", "0.1B"])
def test_bad_sizes_are_usage_errors(ckpts, tmp_path, capsys, option, value):
    cfg = write_config(tmp_path, ckpts)
    assert main(["merge", str(cfg), str(tmp_path / "o"), f"{option}={value}"]) == 2
    line = one_error_line(capsys)
    assert option in line and repr(value) in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,match", [
    (["--seed", "-1"], "--seed"),
    (["--seed", "x"], "--seed"),
    (["--device", "gpu"], "--device"),
    (["--backend", "nope"], "--backend"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_arguments_are_usage_errors(ckpts, tmp_path, capsys, args, match):
    cfg = write_config(tmp_path, ckpts)
    assert main(["merge", str(cfg), str(tmp_path / "o")] + args) == 2
    assert match in one_error_line(capsys)


def test_missing_arguments_and_commands(capsys):
    assert main([]) == 2
    one_error_line(capsys)
    assert main(["merge"]) == 2
    assert "config" in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(ckpts, tmp_path, capsys):
    cfg = write_config(tmp_path, ckpts)
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--device", "cuda", "--quiet"]) == 2
    assert "cuda" in one_error_line(capsys)


@pytest.mark.parametrize("content,match", [
    ("merge_method: ranked_ties\nmodels: [a]\n", "ranked_ties.*supported: .*ties"),
    ("merge_method: ramplus_tl\nmodels: [a]\n", "base_model: merge_method ramplus_tl needs a base"),
    ("- a\n", "a merge config must be a YAML mapping"),
    ("[" * 100_000, "nested too deeply"),
    ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_config_errors_are_usage_errors(tmp_path, capsys, content, match):
    cfg = tmp_path / "c.yml"
    cfg.write_text(content)
    assert main(["merge", str(cfg), str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert str(cfg) in line and re.search(match, line)


def test_bad_parameter_values_are_usage_errors(ckpts, tmp_path, capsys):
    for params, match in [({"density": float("nan")}, "density: must be finite"),
                          ({"weight": True}, "weight: must be a number"),
                          ({"weight": []}, "weight: an empty list")]:
        cfg = write_config(tmp_path, ckpts, **params)
        assert main(["merge", str(cfg), str(tmp_path / "o")]) == 2
        assert match in one_error_line(capsys)


def test_bad_input_files_are_failures(ckpts, tmp_path, capsys):
    cfg = write_config(tmp_path, ckpts)
    cfg.write_text(cfg.read_text().replace(ckpts["m1"], str(tmp_path / "no_such_model")))
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--quiet"]) == 1
    assert "no_such_model" in one_error_line(capsys)


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_unexpected_exceptions_are_internal_errors(ckpts, tmp_path, capsys, monkeypatch):
    import fastmerge.pipeline.native as native
    monkeypatch.setattr(native, "merge", _boom)
    cfg = write_config(tmp_path, ckpts)
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--quiet"]) == 1
    line = one_error_line(capsys)
    assert "internal error" in line and "RuntimeError: boom" in line and "--debug" in line
    # --debug (before or after the command) and FASTMERGE_DEBUG=1 show the traceback
    for argv in (["--debug", "merge", str(cfg), str(tmp_path / "o")],
                 ["merge", str(cfg), str(tmp_path / "o"), "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    monkeypatch.setenv("FASTMERGE_DEBUG", "1")
    assert main(["merge", str(cfg), str(tmp_path / "o")]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_every_command_reports_one_line(capsys, monkeypatch):
    import fastmerge.backends as backends
    monkeypatch.setattr(backends, "available_backends", _boom)
    assert main(["backends"]) == 1
    assert "internal error" in one_error_line(capsys)
    assert main(["demo"]) == 1
    assert "internal error" in one_error_line(capsys)
    import fastmerge.cli.second_moments as sm
    monkeypatch.setattr(sm, "main", _boom)
    assert main(["--debug", "extract-second-moments", "x"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_budget_error_reports_the_real_minimum(ckpts, tmp_path, capsys):
    """A merge with the reported figure runs; one byte less fails with the same figure."""
    for method, extra in [("task_arithmetic", []), ("dare_ties", []),
                          ("task_arithmetic", ["--backend", "torch"])]:
        cfg = write_config(tmp_path, ckpts, method,
                           **({"density": 0.5} if method == "dare_ties" else {}))
        base = ["merge", str(cfg), str(tmp_path / "o"), "--quiet", "--overwrite"] + extra
        assert main(base + ["--memory-budget", "1MB"]) == 2
        need = int(re.search(r"needs at least (\d+) bytes", one_error_line(capsys)).group(1))
        assert main(base + ["--memory-budget", str(need - 1)]) == 2
        assert f"needs at least {need} bytes" in one_error_line(capsys)
        assert main(base + ["--memory-budget", str(need)]) == 0, capsys.readouterr().err
        capsys.readouterr()


def test_errors_do_not_import_torch(ckpts, tmp_path):
    cfg = write_config(tmp_path, ckpts, density=float("nan"))
    code = ("import sys; from fastmerge.cli import main; "
            f"rc = main(['merge', {str(cfg)!r}, {str(tmp_path / 'o')!r}]); "
            f"rc2 = main(['merge', {str(cfg)!r}, 'o', '--memory-budget', 'inf']); "
            "assert (rc, rc2) == (2, 2), (rc, rc2); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_backends_command_lists_the_registry(capsys):
    """`fastmerge backends`: one line per registered backend with its devices and state, and
    `--backend` accepts exactly the registry's names (plus auto)."""
    from fastmerge.backends import BACKEND_NAMES, REGISTRY, available_backends
    from fastmerge.cli import build_parser
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    states = available_backends()
    assert [ln.split()[0] for ln in lines] == list(REGISTRY)
    for ln, (name, spec) in zip(lines, REGISTRY.items()):
        assert ln.split()[1] == ",".join(spec.devices)
        assert ln.split(None, 2)[2] == states[name]
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    backend = next(a for a in merge._actions if a.dest == "backend")
    assert tuple(backend.choices) == BACKEND_NAMES
