"""Peak RSS of `fastmerge merge` against --memory-budget, per method family and input kind.

Each case runs in a child process: the CLI's merge (pipeline/native.py ``merge``: the
torch-free kernels, or backend "cpu" where the merge needs torch) of a tiny warm-up config
first (imports, thread pools, the kernels' per-thread buffers), then the high-water mark is
reset (/proc/self/clear_refs) and the real merge runs under the budget. The figure is the
child's VmHWM minus its RSS just before that merge, beside the budget and the chunk size
(and, for reference, minus its RSS right after ``import fastmerge.pipeline.native``).

    PYTHONPATH=. python benchmarks/memory_probe.py --budgets 64,128 [--methods ties,della]
        [--kinds bf16,mixed,bin,lora] [--json out.json]

Inputs: a base and two fine-tunes of four 2816x1024 MLP matrices (2.9M elements each,
several chunks at 64-128 MiB), in bf16 safetensors, mixed dtypes (base float32, model 0
float16, model 1 bfloat16), .bin files, or a LoRA adapter over the base as model 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ckpt_util import write_adapter, write_bin  # noqa: E402

from fastmerge.cli.demo import make_synthetic_checkpoints, save_checkpoint  # noqa: E402

CHILD = textwrap.dedent("""
    import json, sys
    from fastmerge.pipeline import native

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    cfg, out, budget, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    idle = status("VmRSS")
    native.merge(warm, out + "-warm")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = status("VmRSS")
    res = native.merge(cfg, out, memory_budget=budget)
    print(json.dumps({"idle": idle, "baseline": baseline, "peak": status("VmHWM"),
                      "chunk": res.chunk_elems, "torch": "torch" in sys.modules}))
""")

# method -> (models used, top-level parameters, per-model parameters)
METHODS = {
    "task_arithmetic": (2, {}, {"weight": 0.5}),
    "ties": (2, {}, {"weight": 0.5, "density": 0.5}),
    "dare_ties": (2, {"rescale": "l1"}, {"weight": 0.5, "density": 0.5}),
    "breadcrumbs_ties": (2, {}, {"weight": 0.5, "density": 0.5}),
    "consensus_ties": (2, {}, {"weight": 0.5, "density": 0.5}),
    "della": (2, {}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
    "slerp": (1, {"t": 0.4}, {}),
    "model_stock": (2, {}, {}),
    "sce": (2, {"select_topk": 0.5}, {}),
    "passthrough": (1, None, {}),
}
KINDS = ("bf16", "mixed", "bin", "lora")
SHAPE = dict(hidden=1024, inter=2816, vocab=2000, layers=2, only=("up_proj", "down_proj"))


def _state(d) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def make_inputs(root: Path, kind: str, shape=None) -> tuple[str, list]:
    """(base reference, [model references]) of input kind ``kind`` under ``root``."""
    p = make_synthetic_checkpoints(root / "st", n_models=2, shards=2, **(shape or SHAPE))
    if kind == "bf16":
        return str(p["base"]), [str(m) for m in p["models"]]
    sds = [_state(d) for d in [p["base"], *p["models"]]]
    if kind == "mixed":
        dts = (torch.float32, torch.float16, torch.bfloat16)
        dirs = [save_checkpoint(root / f"mixed{i}", {k: v.to(dt) for k, v in sd.items()}, 2)
                for i, (sd, dt) in enumerate(zip(sds, dts))]
        return str(dirs[0]), [str(d) for d in dirs[1:]]
    if kind == "bin":
        dirs = [write_bin(root / f"bin{i}", sd, shards=2) for i, sd in enumerate(sds)]
        return str(dirs[0]), [str(d) for d in dirs[1:]]
    if kind == "lora":
        ad = write_adapter(root / "adapter", sds[0], ["up_proj", "down_proj"], r=16, alpha=16)
        return str(p["base"]), [str(p["models"][0]), f"{p['base']}+{ad}"]
    raise ValueError(kind)


def config(path: Path, method: str, base: str, models: list) -> Path:
    n, top, per = METHODS[method]
    cfg = {"merge_method": method,
           "models": [{"model": m, **({"parameters": per} if per else {})} for m in models[:n]]}
    if top is not None:
        cfg["base_model"] = base
    if top:
        cfg["parameters"] = top
    path.write_text(yaml.safe_dump(cfg))
    return path


def warm_inputs(root: Path, kind: str) -> tuple[str, list]:
    """Tiny inputs of the same kind: the warm-up imports what the merge needs (torch for a
    .bin or LoRA input: its import is code, not merge data, and outside the budget)."""
    return make_inputs(root / "warm", kind, dict(layers=1, hidden=32, inter=48, vocab=64,
                                                 only=("up_proj", "down_proj")))


def measure(root: Path, method: str, kind: str, budget: int, inputs, warm) -> dict:
    cfg = config(root / f"{method}-{kind}.yml", method, *inputs)
    wcfg = config(root / f"{method}-{kind}-warm.yml", method, *warm)
    out = root / f"out-{method}-{kind}-{budget}"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(out), str(budget),
                        str(wcfg)], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        return {"method": method, "kind": kind, "budget": budget, "error": r.stderr[-400:]}
    m = json.loads(r.stdout.strip().splitlines()[-1])
    for d in (out, Path(str(out) + "-warm")):
        subprocess.run(["rm", "-rf", str(d)], check=False)
    return {"method": method, "kind": kind, "budget": budget, "chunk": m["chunk"],
            "grew": m["peak"] - m["baseline"], "over_idle": m["peak"] - m["idle"],
            "torch": m["torch"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="64,128", help="MiB, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    ap.add_argument("--inter", type=int, default=SHAPE["inter"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    shape = dict(SHAPE, hidden=a.hidden, inter=a.inter)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in a.kinds.split(","):
            inputs = make_inputs(root / kind, kind, shape)
            warm = warm_inputs(root / kind, kind)
            for method in a.methods.split(","):
                for mib in a.budgets.split(","):
                    row = measure(root, method, kind, int(mib) << 20, inputs, warm)
                    rows.append(row)
                    if "error" in row:
                        print(f"{method:17s} {kind:6s} {mib:>4s} MiB  ERROR {row['error']}")
                        continue
                    print(f"{method:17s} {kind:6s} {mib:>4s} MiB  chunk {row['chunk']:>9,}  "
                          f"peak growth {row['grew'] / 2 ** 20:6.1f} MiB "
                          f"({row['grew'] / row['budget']:.2f} of budget; over idle import "
                          f"{row['over_idle'] / 2 ** 20:6.1f} MiB)"
                          f"{'  torch' if row['torch'] else ''}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
