"""CPU benchmark of fastmerge's TIES against peft and mergekit, on this machine.

    python benchmarks/bench_cpu.py [--shapes 4096x4096,4096x11008,32000x4096] [--n 2,3,8]
        [--density 0.2] [--reps 3] [--peer-reps 1] [--out benchmarks/results/cpu.md]
        [--plot docs/throughput_cpu.png] [--skip-peers-above 0]

For bf16 tensors of each shape and N fine-tunes it measures, in one run:
- this machine's copy bandwidth: a 1 GiB torch tensor copy (read + write bytes / time);
- fastmerge ``cpu`` (the C++ kernels): full TIES via ``fastmerge.merge_tensors`` = the one-pass
  exact top-k (``topk_window``; the radix selection's two histogram passes where a window
  misses) + the fused merge pass, and the split (selection / merge);
- fastmerge ``torch`` (the plain-torch kernels of ops.py, the same passes in torch);
- peft's ``peft.utils.merge_utils.ties`` on the bf16 task vectors (+ the base add);
- mergekit 0.1.5's TIES math: ``mergekit.sparsify.sparsify(..., magnitude)`` per model and
  ``generalized_task_arithmetic.get_mask(..., "sum")`` + the disjoint weighted mean exactly as
  ``GeneralizedTaskArithmeticMerge.merge_group`` does it (bf16 deltas, as mergekit computes).
GB/s is reported two ways: "all passes" = every byte the implementation's passes read and write
for fastmerge (one read of base + N models per pass, 1 write), and "useful" = (N + 1 inputs
+ 1 output) * bytes / time, the same for every implementation. It prints a markdown table,
writes it to --out and draws --plot (throughput vs tensor size, copy bandwidth as the ceiling).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import fastmerge as fm  # noqa: E402
from fastmerge.backends import availability, get_backend  # noqa: E402
from fastmerge.methods import resolve_spec  # noqa: E402
from fastmerge.planning.plan import plan_tensor  # noqa: E402
from fastmerge.planning.selection import Chunk  # noqa: E402

GB = 1e9


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


_COPY_BUFFERS: dict = {}


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """GB/s of a 1 GiB torch copy (read + write bytes), best of ``reps``; the buffers are kept
    between calls (their page faults are not the copy's)."""
    if nbytes not in _COPY_BUFFERS:
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        _COPY_BUFFERS[nbytes] = (src, torch.empty_like(src))
    src, dst = _COPY_BUFFERS[nbytes]
    dst.copy_(src)
    t = best_time(lambda: dst.copy_(src), reps)
    return 2 * nbytes / t / GB


def make_inputs(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float32)
    models = []
    for _ in range(n):
        d = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.01).add_(base)
        models.append(d.to(torch.bfloat16))
        del d
    return base.to(torch.bfloat16), models


# ----------------------------------------------------------------------------- implementations
def run_fastmerge(backend, base, models, density):
    return fm.merge_tensors(base, models, "ties", density=density, backend=backend,
                            tensor_name="model.layers.0.mlp.up_proj.weight")


def fastmerge_split(base, models, density, reps):
    """(selection seconds, merge seconds, read passes of the selection) of the cpu backend."""
    be = get_backend("cpu", "cpu")
    spec = resolve_spec("ties", len(models), density=density)
    chunk = Chunk(base, models, [], 0, "x")
    plan = plan_tensor(spec, lambda: [chunk], be, base.numel(), "x")
    sel = best_time(lambda: plan_tensor(spec, lambda: [chunk], be, base.numel(), "x"), reps)
    mrg = best_time(lambda: be.merge(chunk, plan, torch.bfloat16), reps)
    return sel, mrg, plan.passes


def run_peft(base, models, density):
    from peft.utils.merge_utils import ties
    deltas = [m - base for m in models]
    w = torch.ones(len(models), dtype=base.dtype, device=base.device)
    return (base + ties(deltas, w, density, "total")).to(base.dtype)


def run_mergekit(base, models, density):
    """mergekit 0.1.5 GeneralizedTaskArithmeticMerge.merge_group for ties, its own functions."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import SparsificationMethod, sparsify
    deltas = base.new_empty((len(models), *base.shape))
    for i, m in enumerate(models):
        deltas[i] = sparsify(m - base, density=density, method=SparsificationMethod.magnitude)
    weights = torch.ones(len(models), dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights = weights.unsqueeze(-1)
    deltas.mul_(weights)
    mask = get_mask(deltas, method="sum", mask_dtype=base.dtype)
    mixed = (deltas * mask).sum(dim=0)
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    mixed /= divisor
    return (base + mixed).to(base.dtype)


def per_pass_costs(shape=(4096, 4096), ns=(2, 3, 8), density=0.2, reps=5):
    """ns per (element x model) of each cpu pass, on 1 thread and on all threads."""
    import dataclasses

    from fastmerge.planning.selection import level0
    out = []
    be = get_backend("cpu", "cpu")
    radix_be = dataclasses.replace(be, topk_window=None)  # the two-pass radix selection
    old = torch.get_num_threads()
    for n in ns:
        base, models = make_inputs(shape, n, seed=1)
        numel = base.numel()
        chunk = Chunk(base, models, [], 0, "x")
        spec = resolve_spec("ties", n, density=density)
        plan = plan_tensor(spec, lambda: [chunk], be, numel, "x")
        for threads in (1, old):
            torch.set_num_threads(threads)
            l0 = best_time(lambda: level0(be, n, 0, lambda: [chunk]), reps)
            radix = best_time(lambda: plan_tensor(spec, lambda: [chunk], radix_be, numel, "x"),
                              reps)
            sel = best_time(lambda: plan_tensor(spec, lambda: [chunk], be, numel, "x"), reps)
            mrg = best_time(lambda: be.merge(chunk, plan, torch.bfloat16), reps)
            scale = 1e9 / (numel * n)
            # dare_ties with mergekit's rescale: true (L1): a statistics pass (Philox draws,
            # sums of |t| kept) + the merge pass (the same draws again)
            dspec = resolve_spec("dare_ties", n, density=0.5, rescale="l1")
            dplan = plan_tensor(dspec, lambda: [chunk], be, numel, "x")
            dsel = best_time(lambda: plan_tensor(dspec, lambda: [chunk], be, numel, "x"), reps)
            dmrg = best_time(lambda: be.merge(chunk, dplan, torch.bfloat16), reps)
            out.append((n, threads, sel * scale, l0 * scale, (radix - l0) * scale, mrg * scale,
                        (sel + mrg) * 1e9 / numel, dsel * scale, dmrg * scale))
        torch.set_num_threads(old)
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,4096x11008,32000x4096")
    ap.add_argument("--n", default="2,3,8")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--peer-reps", type=int, default=1)
    ap.add_argument("--torch-max-numel", type=float, default=5e7,
                    help="time fastmerge's torch backend only up to this many elements")
    ap.add_argument("--peers-max-work", type=float, default=3.7e8,
                    help="time peft/mergekit only where N * numel <= this (their runtime)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu.md"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "throughput_cpu.png"))
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw --plot from the table in --out, without measuring")
    args = ap.parse_args(argv)
    if args.plot_only:
        return replot(args.out, args.plot)
    ok, why = availability("cpu")
    if not ok:
        sys.exit(f"the cpu backend is not built: {why}")
    import fastmerge._C as C
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    ns = [int(x) for x in args.n.split(",")]
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    bw = copy_bandwidth()
    machine = (f"{cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, kernels: {C.isa()}")
    print(f"# machine: {machine}\n# copy bandwidth: {bw:.1f} GB/s (read + write)\n", flush=True)
    rows, points, bws = [], [], [bw]
    for shape in shapes:
        for n in ns:
            base, models = make_inputs(shape, n)
            numel = base.numel()
            useful = (n + 2) * 2 * numel
            res = {}
            run_fastmerge("cpu", base, models, args.density)  # warm-up
            # this shared VM's copy bandwidth swings between minutes (36-75 GB/s measured the
            # same way): each row's ceiling is the larger of the copies just before and after
            row_bw = copy_bandwidth()
            res["fastmerge cpu"] = best_time(
                partial(run_fastmerge, "cpu", base, models, args.density), args.reps)
            row_bw = max(row_bw, copy_bandwidth())
            bws.append(row_bw)
            sel, mrg, sel_passes = fastmerge_split(base, models, args.density, args.reps)
            all_pass = (sel_passes + 1) * (n + 1) * 2 * numel + 2 * numel
            if numel <= args.torch_max_numel:
                res["fastmerge torch"] = best_time(
                    partial(run_fastmerge, "torch", base, models, args.density), 1)
            if n * numel <= args.peers_max_work:  # else: not run (too slow), left out
                res["peft ties"] = best_time(partial(run_peft, base, models, args.density),
                                             args.peer_reps)
                res["mergekit ties"] = best_time(
                    partial(run_mergekit, base, models, args.density), args.peer_reps)
            ours = res["fastmerge cpu"]
            for impl, sec in res.items():
                gbs_all = all_pass / sec / GB if impl == "fastmerge cpu" else None
                rows.append(dict(shape=f"{shape[0]}x{shape[1]}", n=n, impl=impl, sec=sec,
                                 gbs_all=gbs_all, gbs_useful=useful / sec / GB,
                                 pct=(all_pass / sec / GB) / row_bw * 100 if gbs_all else None,
                                 row_bw=row_bw if gbs_all else None,
                                 speedup=sec / ours,
                                 split=(sel, mrg) if impl == "fastmerge cpu" else None,
                                 passes=sel_passes + 1))
                points.append((impl, n, numel, useful / sec / GB))
                print(f"{shape} N={n} {impl}: {sec:.3f} s", flush=True)
            del base, models
    passes = per_pass_costs(density=args.density)
    # The plot's ceiling: the largest copy bandwidth measured in the run (conservative).
    bw_end = copy_bandwidth()
    bw_start, bw = bw, max(bws + [bw_end])
    machine += (f"; copy bandwidth at start / end: {bw_start:.1f} / {bw_end:.1f} GB/s, "
                f"{min(bws + [bw_end]):.1f}-{bw:.1f} GB/s over the run")
    elapsed = time.perf_counter() - t_start
    machine += (f"; load average (1 min) at start / end of the run: {load0:.1f} / "
                f"{os.getloadavg()[0]:.1f}")
    table = render(rows, bw, machine, args, elapsed, passes)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    if args.plot:
        plot(points, bw, args.plot, machine)


def render(rows, bw, machine, args, elapsed, passes=()) -> str:
    lines = [
        "# fastmerge CPU benchmark (TIES, bf16)", "",
        f"Machine: {machine}.  ",
        f"Measured copy bandwidth: **{bw:.1f} GB/s** (1 GiB torch copy, read + write bytes; "
        f"the largest measurement of the run; each fastmerge row's % uses the larger of the "
        f"copies measured just before and just after its timing, column 'copy BW').  ",
        f"TIES with density {args.density}, weights 1, normalize (mergekit's defaults); "
        f"fastmerge = the one-pass exact top-k (sampled window, csrc/cpu/select.cpp; the radix "
        f"selection's 2 histogram passes where a window misses) + 1 fused merge pass, "
        f"column 'passes'. Times are the best of {args.reps} (fastmerge cpu) or "
        f"{args.peer_reps} (peers, torch backend: 1) runs; the whole script took "
        f"{elapsed:.0f} s.", "",
        "GB/s (all passes) = bytes every fastmerge pass reads and writes = (passes (N+1) + 1) * "
        "2 bytes * numel / time; useful GB/s = (N + 2) * 2 bytes * numel / time (inputs once, "
        "output once), comparable across implementations. % copy = all-pass GB/s / measured "
        "copy bandwidth. speedup = implementation's time / fastmerge cpu's time.", "",
        "| shape | N | implementation | seconds | passes | GB/s all passes | useful GB/s | "
        "copy BW GB/s | % of copy BW | fastmerge cpu speedup vs this | "
        "cpu split: selection / merge (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = f"{r['split'][0]:.3f} / {r['split'][1]:.3f}" if r["split"] else ""
        gbs_all = "" if r["gbs_all"] is None else f"{r['gbs_all']:.1f}"
        pct = "" if r["pct"] is None else f"{r['pct']:.0f}%"
        rbw = "" if r.get("row_bw") is None else f"{r['row_bw']:.1f}"
        speed = "" if r["impl"] == "fastmerge cpu" else f"{r['speedup']:.1f}x"
        npass = r["passes"] if r["impl"] == "fastmerge cpu" else ""
        lines.append(f"| {r['shape']} | {r['n']} | {r['impl']} | {r['sec']:.3f} | {npass} | "
                     f"{gbs_all} | {r['gbs_useful']:.2f} | {rbw} | {pct} | {speed} | {split} |")
    if passes:
        lines += ["", "Per pass, 4096x4096 bf16, ns per (element x model) (best of 5). "
                  "Selection: the one-pass top-k that runs, and for comparison the radix "
                  "selection it replaces (level 1 = radix plan - level 0):", "",
                  "| N | threads | one-pass top-k | radix level 0 | radix level 1 | fused merge | "
                  "full TIES ns per element | dare_ties (rescale l1): statistics pass | "
                  "dare_ties merge |", "|---|---|---|---|---|---|---|---|---|"]
        for n, th, sel, l0, l1, mrg, tot, dst, dmg in passes:
            lines.append(f"| {n} | {th} | {sel:.2f} | {l0:.2f} | {l1:.2f} | {mrg:.2f} | "
                         f"{tot:.2f} | {dst:.2f} | {dmg:.2f} |")
    lines.append("")
    return "\n".join(lines)


def replot(table_path, plot_path):
    """The plot again from a results table written by ``render``."""
    text = open(table_path).read()
    bw = float(text.split("Measured copy bandwidth: **")[1].split(" GB/s")[0])
    machine = text.split("Machine: ")[1].split(";")[0]
    points = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) in (9, 10, 11) and "x" in cells[0] and cells[1].isdigit():
            r, c = (int(v) for v in cells[0].split("x"))
            n, numel = int(cells[1]), r * c
            points.append((cells[2], n, numel, (n + 2) * 2 * numel / float(cells[3]) / GB))
    plot(points, bw, plot_path, machine)


def plot(points, bw, path, machine):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    impls = sorted({p[0] for p in points})
    markers = {2: "o", 3: "s", 8: "^"}
    styles = {2: "-", 3: "--", 8: ":"}
    colors = dict(zip(impls, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for impl in impls:  # one colour per implementation, one marker / line style per N
        for n in sorted({p[1] for p in points}):
            pts = sorted((p[2], p[3]) for p in points if p[0] == impl and p[1] == n)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=markers.get(n, "x"),
                        linestyle=styles.get(n, "-"), color=colors[impl],
                        label=f"{impl}, N={n}")
    ax.axhline(bw, color="k", linestyle="--", label=f"measured copy bandwidth {bw:.1f} GB/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("elements per tensor")
    ax.set_ylabel("useful GB/s ((N+2) x 2 bytes x numel / time)")
    ax.set_title(f"TIES throughput, bf16 — {machine[:70]}", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
