"""The memory budget holds on a checkpoint several times larger than the budget: peak RSS
of a child process, measured against its own baseline just before merging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from fastmerge.demo import make_synthetic_checkpoints

REPO = Path(__file__).resolve().parents[1]
BUDGET = 32 * 2 ** 20

CHILD = textwrap.dedent("""
    import json, sys, resource
    import torch, fastmerge
    from fastmerge.engine.engine import peak_rss_bytes
    cfg, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    baseline = peak_rss_bytes()
    res = fastmerge.merge_checkpoints(cfg, out, backend="torch", memory_budget=budget)
    print(json.dumps({"baseline": baseline, "peak": peak_rss_bytes(), "chunk": res.chunk_elems,
                      "bytes_in": res.bytes_in}))
""")


@pytest.mark.slow
def test_peak_rss_stays_under_the_budget(tmp_path):
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=2, hidden=1024,
                                   inter=2816, vocab=2000, shards=2,
                                   only=("up_proj", "down_proj"))
    size = sum(f.stat().st_size for d in [p["base"], *p["models"]]
               for f in d.glob("*.safetensors"))
    assert size > 2.8 * BUDGET
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(p["base"]),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in p["models"]]}))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(tmp_path / "out"),
                        str(BUDGET)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["baseline"]
    # the largest tensor (up_proj, 2816 x 1024) is split into row chunks
    assert m["chunk"] < 2816 * 1024
    assert grew <= BUDGET, f"peak RSS grew {grew / 2 ** 20:.1f} MiB over a " \
                           f"{BUDGET / 2 ** 20:.0f} MiB budget ({size / 2 ** 20:.0f} MiB input)"
    from safetensors import safe_open
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    with safe_open(str(tmp_path / "out" / idx["weight_map"][name]), "pt") as f:
        got = f.get_tensor(name)
    from engine_util import load_dir
    b = load_dir(p["base"])[name].float()
    want = b + sum(0.5 * (load_dir(x)[name].float() - b) for x in p["models"])
    torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=1e-2, atol=1e-3)
