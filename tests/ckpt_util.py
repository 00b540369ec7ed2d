"""Inputs as people ship them, for the checkpoint-format tests: .bin files (single, sharded,
legacy), LoRA adapters written the way peft writes them, and a peak-RSS measurement."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def state_dict_of(d) -> dict:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_bin(d, sd: dict, shards: int = 1, legacy: bool = False, config=None) -> Path:
    """``sd`` as pytorch_model.bin, or as ``shards`` files with their index."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    if shards == 1:
        torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return d
    names = list(sd)
    wmap = {}
    for k in range(shards):
        fn = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = names[k::shards]
        torch.save({n: sd[n] for n in part}, d / fn)
        wmap.update({n: fn for n in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    return d


def write_safetensors(d, sd: dict, config=None) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d


def write_adapter(d, base_sd: dict, targets, r=4, alpha=8, seed=0, as_bin=False, **cfg) -> Path:
    """A peft-style LoRA adapter for the 2-D tensors ``<module>.weight`` of ``base_sd`` whose
    module name ends with one of ``targets``; returns the directory."""
    g = torch.Generator().manual_seed(seed)
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    weights = {}
    for name, w in base_sd.items():
        module = name[:-len(".weight")]
        if not name.endswith(".weight") or not module.endswith(tuple(targets)) or w.dim() != 2:
            continue
        rows, cols = w.shape
        pre = f"base_model.model.{module}"
        weights[f"{pre}.lora_A.weight"] = torch.randn(r, cols, generator=g).to(w.dtype)
        weights[f"{pre}.lora_B.weight"] = torch.randn(rows, r, generator=g).to(w.dtype) * 0.1
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
              "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None, **cfg}
    (d / "adapter_config.json").write_text(json.dumps(config))
    if as_bin:
        torch.save(weights, d / "adapter_model.bin")
    else:
        save_file(weights, str(d / "adapter_model.safetensors"))
    return d


def write_config(path, base, models, method="task_arithmetic", **top) -> Path:
    cfg = {"merge_method": method, "models": [{"model": str(m), "parameters": {"weight": 0.5}}
                                              for m in models], **top}
    if base is not None:
        cfg["base_model"] = str(base)
    Path(path).write_text(yaml.safe_dump(cfg))
    return Path(path)


def peak_rss_growth(tmp_path, cfg, warm_cfg, budget: int, backend: str) -> dict:
    """Run tests/test_engine_memory.py's child on ``cfg``: its RSS high-water mark over the
    baseline after a warm-up merge of ``warm_cfg``."""
    from test_engine_memory import CHILD
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(tmp_path / "out"),
                        str(budget), backend, str(warm_cfg)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    m["grew"] = m["peak"] - m["baseline"]
    return m


def native_rss_inputs():
    """For a peak-RSS test of fastmerge merge's path (skipped without fastmerge._core): (the
    32 MiB budget, a seeded generator, six 2816x1024 bf16 up_proj weights: 33 MiB)."""
    import pytest

    from fastmerge.pipeline import native
    if native._core() is None:
        pytest.skip("fastmerge._core is not built")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight":
            torch.randn(2816, 1024, generator=g).bfloat16() for i in range(6)}
    return 32 * 2 ** 20, g, base


def assert_rss_within(tmp_path, cfg, warm_cfg, budget: int, backend: str = "native",
                      allowance: int = 0) -> None:
    """``peak_rss_growth`` of ``cfg`` at most ``budget`` + ``allowance`` (printed)."""
    m = peak_rss_growth(tmp_path, cfg, warm_cfg, budget, backend)
    print(f"peak RSS growth {m['grew'] / 2 ** 20:.1f} MiB")
    assert m["grew"] <= budget + allowance, f"peak RSS grew {m['grew'] / 2 ** 20:.1f} MiB"
