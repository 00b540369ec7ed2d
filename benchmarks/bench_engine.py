"""Checkpoint engine benchmark: ``fastmerge merge`` vs ``mergekit-yaml`` on the same synthetic
Llama-like checkpoints (wall time, peak RSS of the process), results in
benchmarks/results/engine.md.

    python benchmarks/bench_engine.py                      # ~0.2B params, 2 fine-tunes
    python benchmarks/bench_engine.py --preset tiny --methods ties   # quick check

Both tools read the same YAML (mergekit syntax). Peak RSS is each command's own maximum
resident set (getrusage of the child, measured by a wrapper process per run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PRESETS = {  # layers, hidden, intermediate, vocab
    "tiny": (2, 256, 688, 2000),
    "0.2B": (12, 1024, 2816, 16000),
    "0.5B": (24, 1024, 4096, 32000),
}
METHODS = {
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01},
    "task_arithmetic": {},
}
WRAPPER = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
           "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,"
           " text=True); dt = time.perf_counter() - t; "
           "print(json.dumps({'rc': r.returncode, 'seconds': dt, 'err': r.stderr[-2000:], "
           "'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, cached_checkpoints, machine  # noqa: E402


def measure(cmd: list) -> dict:
    r = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_inputs(work: Path, preset: str, n_models: int) -> dict:
    return cached_checkpoints(work / f"ckpt-{preset}-{n_models}", PRESETS[preset], n_models,
                              shards=4, marker="DONE", label="inputs")


def compare(a: Path, b: Path) -> float:
    """max |a - b| / max |b| over a few tensors (sanity check, not a conformance test)."""
    from safetensors.torch import load_file
    fa = {}
    for f in sorted(a.glob("*.safetensors")):
        fa.update(load_file(str(f)))
    fb = {}
    for f in sorted(b.glob("*.safetensors")):
        fb.update(load_file(str(f)))
    worst = 0.0
    for name in list(fa)[:6]:
        x, y = fa[name].float(), fb[name].float()
        worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item())
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="0.2B", choices=sorted(PRESETS))
    p.add_argument("--n-models", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--backend", default="auto")
    p.add_argument("--memory-budget", default="8GiB")
    p.add_argument("--workdir", default="/tmp/fastmerge-bench-engine")
    p.add_argument("--reps", type=int, default=3,
                   help="fastmerge runs per method, best wall time reported (mergekit: 1)")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engine.md"))
    args = p.parse_args(argv)
    work = Path(args.workdir)
    inputs = make_inputs(work, args.preset, args.n_models)
    import fastmerge
    from fastmerge.backends import get_backend
    backend = get_backend(args.backend, "cpu").name
    from fastmerge.pipeline import Checkpoint
    n_params = sum(Checkpoint(inputs["base"]).info(n).numel
                   for n in Checkpoint(inputs["base"]).names)
    rows = []
    for method in args.methods:
        cfg = {"merge_method": method, "base_model": str(inputs["base"]),
               "models": [{"model": str(m), "parameters": {"weight": 0.5, **METHODS[method]}}
                          for m in inputs["models"]], "dtype": "bfloat16"}
        cfg_path = work / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        fm_out, mk_out = work / f"out-fastmerge-{method}", work / f"out-mergekit-{method}"
        shutil.rmtree(fm_out, ignore_errors=True)
        shutil.rmtree(mk_out, ignore_errors=True)
        load = os.getloadavg()[0]
        fm = None
        for _ in range(max(1, args.reps)):  # best of --reps (the VM is shared and noisy)
            shutil.rmtree(fm_out, ignore_errors=True)
            run = measure([sys.executable, "-m", "fastmerge", "merge", str(cfg_path),
                           str(fm_out), "--quiet", "--backend", args.backend,
                           "--memory-budget", args.memory_budget])
            if run["rc"]:
                print(run["err"])
                raise SystemExit(f"fastmerge failed on {method}")
            fm = run if fm is None or run["seconds"] < fm["seconds"] else fm
        from fastmerge.pipeline import load_config
        from fastmerge.pipeline.native import why_not
        path = "engine" if why_not(load_config(cfg_path), "cpu", args.backend) else "native"
        row = {"method": method, "fm": fm, "load": load, "path": path}
        if not args.skip_mergekit:
            mk = measure(["mergekit-yaml", str(cfg_path), str(mk_out), "--quiet",
                          "--random-seed", "0"])
            row["mk"] = mk
            if mk["rc"] == 0 and method in ("ties", "task_arithmetic"):
                row["diff"] = compare(fm_out, mk_out)
            elif mk["rc"]:
                print(mk["err"])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=str)[:400], flush=True)
        shutil.rmtree(fm_out, ignore_errors=True)
        shutil.rmtree(mk_out, ignore_errors=True)

    gib = 2 ** 30
    lines = [
        "# Checkpoint engine: `fastmerge merge` vs `mergekit-yaml`", "",
        f"Machine: {machine()}.", "",
        f"Inputs: synthetic Llama-like checkpoints (bf16), preset {args.preset}: "
        f"{n_params / 1e9:.3f}B parameters per model, base + {args.n_models} fine-tunes, "
        f"4 shards each; both tools read the same YAML (weight 0.5, density 0.5, gamma 0.01 "
        f"for breadcrumbs), output bf16. fastmerge {fastmerge.__version__}, backend "
        f"**{backend}**, memory budget {args.memory_budget}; mergekit-yaml 0.1.5 defaults "
        f"(CPU). Wall time and peak RSS of each whole command (process start to exit); "
        f"fastmerge: best of {args.reps} runs, mergekit: 1 run. fastmerge path: native = "
        f"without torch (fastmerge/pipeline/native.py), engine = merge_checkpoints.", "",
        "| method | fastmerge path | fastmerge s | mergekit s | speed-up | "
        "fastmerge peak RSS GiB | mergekit peak RSS GiB | load avg at start | max rel. diff |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fm, mk = r["fm"], r.get("mk")
        if mk and mk["rc"] == 0:
            lines.append(f"| {r['method']} | {r['path']} | {fm['seconds']:.2f} | "
                         f"{mk['seconds']:.1f} | "
                         f"{mk['seconds'] / fm['seconds']:.2f}x | {fm['peak_rss'] / gib:.2f} | "
                         f"{mk['peak_rss'] / gib:.2f} | {r['load']:.1f} | "
                         f"{r.get('diff', float('nan')):.2g} |")
        else:
            lines.append(f"| {r['method']} | {r['path']} | {fm['seconds']:.2f} | n/a | | "
                         f"{fm['peak_rss'] / gib:.2f} | | {r['load']:.1f} | |")
    lines += ["", "max rel. diff: max |fastmerge - mergekit| / max |mergekit| over the first "
              "six tensors (ties, task_arithmetic; DARE is random in mergekit). Differences "
              "come from mergekit computing task vectors in bf16 (docs/semantics.md) and from "
              "threshold ties.", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
