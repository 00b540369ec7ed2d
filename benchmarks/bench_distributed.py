"""Scaling of a checkpoint merge over processes (torch.distributed, issue 9): 1 process vs
K processes launched by torchrun on this machine, same synthetic Llama-like checkpoint, wall
time; also checks that every multi-process output is bitwise the single-process one.

    python benchmarks/bench_distributed.py                       # ~0.17B params, 2 fine-tunes
    python benchmarks/bench_distributed.py --preset tiny --methods ties --repeat 1   # quick
    python benchmarks/bench_distributed.py --nproc 2,4 --device cuda   # GPUs of one node

Rows: 1 process with all the CPU threads (the CPU kernels are OpenMP-parallel), 1 process
with 1 thread, and K processes with ``--threads-per-proc`` threads each (torchrun's default
is 1). "wall" is the whole command (interpreter + torch start, process group, merge, output);
"merge" is the slowest rank's own time as its summary line reports it. The page cache is
warmed by one untimed run per row; the best of ``--repeat`` runs is reported. Results go to
benchmarks/results/distributed.md.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

PRESETS = {  # layers, hidden, intermediate, vocab
    "tiny": (2, 256, 688, 2000),
    "0.17B": (8, 1024, 2816, 32000),
    "0.5B": (16, 1536, 4096, 32000),
}
METHODS = {
    "ties": [{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 0.5}],
    "dare_ties": [{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 0.5}],
    "task_arithmetic": [{"weight": 0.6}, {"weight": 0.5}],
}
SUMMARY = re.compile(r"merged \d+ tensors .* in ([0-9.]+) s")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, cached_checkpoints, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make(workdir: Path, preset: str, n_models: int) -> dict:
    return cached_checkpoints(workdir / f"ckpt_{preset}_{n_models}", PRESETS[preset], n_models,
                              shards=2, marker="done", label="checkpoints")


def run(cmd: list, env: dict) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    secs = [float(m.group(1)) for m in SUMMARY.finditer(r.stdout)]
    return wall, max(secs) if secs else float("nan"), r.stdout


def same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    if names != sorted(p.name for p in b.glob("*.safetensors")):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/fm_dist_bench")
    ap.add_argument("--preset", default="0.17B", choices=sorted(PRESETS))
    ap.add_argument("--models", type=int, default=2, help="fine-tunes merged (default 2)")
    ap.add_argument("--methods", default="ties,dare_ties,task_arithmetic")
    ap.add_argument("--nproc", default="2", help="process counts to compare with 1, e.g. 2,4")
    ap.add_argument("--threads-per-proc", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/distributed.md"))
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    ck = make(work, args.preset, args.models)
    ncores = os.cpu_count() or 1
    from fastmerge.checkpoint.safetensors_file import Checkpoint
    c = Checkpoint(ck["base"])
    ck_bytes = sum(c.info(n).nbytes for n in c.names)
    c.close()
    base_env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                    PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for method in args.methods.split(","):
        cfg = {"merge_method": method, "base_model": str(ck["base"]),
               "models": [{"model": str(m), "parameters": p}
                          for m, p in zip(ck["models"], METHODS[method] * args.models)],
               "parameters": {"seed": 1}}
        cfg_path = work / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        merge = ["merge", str(cfg_path), None, "--quiet", "--overwrite", "--device", args.device]
        variants = [("1 process", f"{ncores} threads", 1, ncores),
                    ("1 process", "1 thread", 1, 1)]
        variants += [(f"{k} processes", f"{args.threads_per_proc} thread"
                      f"{'s' if args.threads_per_proc > 1 else ''} each", k,
                      args.threads_per_proc) for k in map(int, args.nproc.split(","))]
        ref_out = None
        for label, threads, k, nt in variants:
            out = work / f"out_{method}_{k}_{nt}"
            cmd_args = [a if a is not None else str(out) for a in merge]
            env = dict(base_env, OMP_NUM_THREADS=str(nt))
            if k == 1:
                cmd = [sys.executable, "-m", "fastmerge", *cmd_args]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                       str(k), "--master-addr", "127.0.0.1", "--master-port", None,
                       "-m", "fastmerge", *cmd_args]
            best = None
            for rep in range(args.repeat + 1):     # run 0 warms the page cache, untimed
                c2 = [a if a is not None else str(free_port()) for a in cmd]
                wall, secs, _ = run(c2, env)
                print(f"{method:16s} {label:12s} {threads:14s} run {rep}: wall {wall:.2f} s, "
                      f"merge {secs:.2f} s", flush=True)
                if rep and (best is None or wall < best[0]):
                    best = (wall, secs)
            identical = ""
            if ref_out is None:
                ref_out = out
            else:
                identical = "yes" if same_output(out, ref_out) else "**NO**"
            rows.append((method, label, threads, best[0], best[1], identical))
        for k in {1, *map(int, args.nproc.split(","))}:
            for nt in {1, ncores, args.threads_per_proc}:
                d = work / f"out_{method}_{k}_{nt}"
                if d != ref_out:
                    shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(ref_out, ignore_errors=True)

    lines = [
        "# Multi-process merge scaling (torch.distributed)",
        "",
        f"Command: `python benchmarks/bench_distributed.py --preset {args.preset} "
        f"--methods {args.methods} --nproc {args.nproc} --threads-per-proc "
        f"{args.threads_per_proc} --device {args.device} --repeat {args.repeat}`",
        "",
        f"Machine: {machine()}.",
        "",
        f"Checkpoint: synthetic Llama-like `{args.preset}` preset (layers, hidden, "
        f"intermediate, vocab = {PRESETS[args.preset]}), bf16, base + {args.models} "
        f"fine-tunes, {ck_bytes / 1e9:.2f} GB each ({ck_bytes * (args.models + 1) / 1e9:.2f} "
        f"GB read, {ck_bytes / 1e9:.2f} GB written per merge); backend auto "
        f"({args.device}); page cache warm; best of {args.repeat}.",
        "",
        "| method | processes | threads | wall (s) | merge, slowest rank (s) | speed-up (wall) "
        "vs 1 process, all threads | bitwise = 1 process |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for method in args.methods.split(","):
        mine = [r for r in rows if r[0] == method]
        ref = mine[0][3]
        for m, label, threads, wall, secs, ident in mine:
            lines.append(f"| {m} | {label} | {threads} | {wall:.2f} | {secs:.2f} | "
                         f"{ref / wall:.2f}x | {ident or '(reference)'} |")
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if Path(args.out).exists():
        old = Path(args.out).read_text()
        marker = "\n## What limits the scaling"
        if marker in old:            # keep the hand-written analysis below the table
            text += old[old.index(marker):]
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
