"""DARE on the C++ cpu backend against task arithmetic and the machine's copy bandwidth.

    python benchmarks/bench_dare.py [--shape 4096x11008] [--n 3] [--reps 5]
        [--out benchmarks/results/dare.md] [--plot docs/dare_cpu.png]

Times dare_ties, dare_linear (the default rescale, 1/density: one pass) and dare_ties with
mergekit's ``rescale: true`` (L1: a statistics pass, then the merge) beside task_arithmetic on
the same bf16 tensors, best of ``--reps``, in one run with a copy-bandwidth measurement. "% of
copy BW" counts the bytes of one merge pass (base + N models read, the output written) over
the time, so a method that reads its inputs twice can reach at most about half.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402
from bench_cpu import best_time, copy_bandwidth  # noqa: E402
from helpers import make_finetunes  # noqa: E402
from machine_info import describe  # noqa: E402

import fastmerge as fm  # noqa: E402

CASES = [  # (label, method, parameters)
    ("task_arithmetic", "task_arithmetic", {}),
    ("dare_ties", "dare_ties", {"density": 0.5, "seed": 1}),
    ("dare_linear", "dare_linear", {"density": 0.5, "seed": 1}),
    ("dare_ties, rescale l1 (2 passes)", "dare_ties", {"density": 0.5, "seed": 1,
                                                       "rescale": "l1"}),
]


def load_average() -> str:
    try:
        return " / ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def cpu_seconds(fn, reps) -> float:
    """Best user CPU time of fn() (the process's own, so less sensitive than wall time to
    other processes on a shared machine)."""
    best = float("inf")
    for _ in range(reps):
        t = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        fn()
        best = min(best, resource.getrusage(resource.RUSAGE_SELF).ru_utime - t)
    return best


def measure(shape, n, reps):
    base, models, _ = make_finetunes(shape, n, ("bf16",), seed=0)
    pass_bytes = (base.numel() * base.element_size() * (n + 2))  # base + N models + output
    bw = copy_bandwidth(reps=reps)
    rows, cpu = [], []
    for label, method, params in CASES:
        def run(method=method, params=params):
            return fm.merge_tensors(base, models, method, backend="cpu", tensor_name="w",
                                    **params)
        run()
        t = best_time(run, reps)
        rows.append((label, t, pass_bytes / t / 1e9))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the kernels' thread count follows torch's
    try:
        for label, method, params in CASES:
            cpu.append((label, cpu_seconds(lambda: fm.merge_tensors(
                base, models, method, backend="cpu", tensor_name="w", **params), reps)))
    finally:
        torch.set_num_threads(threads)
    return bw, rows, cpu


def table(shape, n, reps, bw, rows, cpu, load_before, load_after) -> str:
    ta = rows[0][1]
    lines = [
        f"machine: {describe()}; {torch.get_num_threads()} threads",
        f"load average (1/5/15 min) before: {load_before}, after: {load_after} "
        "(a shared machine: re-measure on a quiet one for final numbers)",
        f"copy bandwidth {bw:.1f} GB/s; tensor {shape[0]}x{shape[1]} bf16, N = {n}, best of "
        f"{reps}; % of copy BW counts one pass's bytes (base + N models + output)",
        "",
        "| method | seconds | x task_arithmetic | GB/s (one pass) | % of copy BW |",
        "|---|---|---|---|---|",
    ]
    for label, t, gbs in rows:
        lines.append(f"| {label} | {t:.4f} | {t / ta:.2f} | {gbs:.1f} | {100 * gbs / bw:.0f}% |")
    lines += ["", "1 thread, user CPU seconds of the process (best of "
              f"{reps}; what the merge itself costs, whatever else runs):", "",
              "| method | CPU seconds | x task_arithmetic |", "|---|---|---|"]
    for label, t in cpu:
        lines.append(f"| {label} | {t:.4f} | {t / cpu[0][1]:.2f} |")
    return "\n".join(lines) + "\n"


def plot(path, bw, rows, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [r[0] for r in rows] + ["copy (torch)"]
    vals = [r[2] for r in rows] + [bw]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars = ax.barh(labels[::-1], vals[::-1], color=["#999999"] + ["#4477aa"] * len(rows))
    for b, v in zip(bars, vals[::-1]):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.1f}", va="center")
    ax.set_xlabel("GB/s (bytes of one merge pass / time; copy: read + write)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(vals) * 1.15)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x11008")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "dare.md"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "dare_cpu.png"))
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split("x"))
    load_before = load_average()
    bw, rows, cpu = measure(shape, args.n, args.reps)
    text = table(shape, args.n, args.reps, bw, rows, cpu, load_before, load_average())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# DARE on the cpu backend (benchmarks/bench_dare.py)\n\n" + text)
    if args.plot:
        plot(args.plot, bw, rows, f"DARE vs task arithmetic, {args.shape} bf16, N = {args.n} "
             f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
