"""GPU benchmark of fastmerge's TIES: one command, on whatever GPU torch sees.

    python benchmarks/gpu.py [--shapes 4096x4096,4096x11008,32000x4096,128256x4096]
        [--n 2,4,8] [--backends cuda,triton,torch] [--density 0.2] [--reps 5]
        [--out benchmarks/results/gpu.md] [--bandwidth-tbs 3.35]

On a GPU it measures, for bf16 tensors of each shape and N models:
- the device copy bandwidth (a 2 GiB device-to-device copy: read + write bytes / time);
- per fastmerge backend (cuda, triton, torch): full TIES (fastmerge.merge_tensors), and the
  split: threshold selection (plan_tensor: level-0 + level-1 histograms) and the merge pass
  (fastmerge::fused_merge alone), with the merge pass's GB/s and % of the copy bandwidth;
- per primitive op (score_histogram, model_stats, fused_merge) the time per backend, which
  gives the suggested ``fastmerge.backends.AUTO_PREFERENCE["cuda"]``;
- mergekit 0.1.5's TIES math (sparsify(..., magnitude) + get_mask + disjoint mean, as
  GeneralizedTaskArithmeticMerge.merge_group computes it) and peft's
  ``peft.utils.merge_utils.ties`` on the same GPU tensors, and the speedups over both.
Goals: merge pass >= 85% of the measured copy bandwidth; full TIES >= 30x mergekit.

Without a GPU it prints, clearly labelled as a PROJECTION, the bytes each pass moves and the
time that would take at a stated bandwidth (default 3.35 TB/s, H100 SXM HBM3 nominal), and
writes the results file saying that nothing has run on a GPU yet.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

DEFAULT_SHAPES = "4096x4096,4096x11008,32000x4096,128256x4096"
OPS = ("score_histogram", "model_stats", "fused_merge")
GB = 1e9


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        a, b = item.lower().split("x")
        out.append((int(a), int(b)))
    return out


# ----------------------------------------------------------------------------- traffic model
def traffic(numel: int, n: int, elem: int = 2) -> dict:
    """Bytes each pass of a fastmerge TIES moves (bf16 in and out, elem bytes per element).

    selection: level-0 and level-1 histogram passes, each reading base + N models once
    (the CUDA kernel reads the base once per tile for all N models); merge: base + N models
    read once, the output written once. mergekit/peft move several times more (float32
    temporaries, argsort), which is not modelled here."""
    read = (n + 1) * numel * elem
    return {"level0": read, "level1": read, "merge": read + numel * elem,
            "total": 3 * read + numel * elem}


def projection(shapes, ns, tbs: float) -> list[str]:
    bw = tbs * 1e12
    lines = [f"PROJECTION (nothing measured): bytes moved per bf16 TIES and the time at "
             f"{tbs:.2f} TB/s (H100 SXM HBM3 nominal unless --bandwidth-tbs), and at 85% of it "
             f"(the merge-pass goal).", "",
             "| shape | N | merge pass bytes | merge @100% | merge @85% | full TIES bytes "
             "(3 passes) | full TIES @85% |",
             "|---|---|---|---|---|---|---|"]
    for (r, c) in shapes:
        numel = r * c
        for n in ns:
            t = traffic(numel, n)
            lines.append(f"| {r}x{c} | {n} | {t['merge'] / GB:.3f} GB | "
                         f"{t['merge'] / bw * 1e3:.3f} ms | {t['merge'] / (0.85 * bw) * 1e3:.3f} ms"
                         f" | {t['total'] / GB:.3f} GB | {t['total'] / (0.85 * bw) * 1e3:.3f} ms |")
    return lines


# ----------------------------------------------------------------------------- timing
def cuda_time(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of fn() on the current stream (CUDA events; host syncs inside fn count)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    nbytes = 2 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), max(reps, 5), warmup=2)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / t


# ----------------------------------------------------------------------------- peers
# mergekit 0.1.5's TIES exactly as GeneralizedTaskArithmeticMerge.merge_group computes it, and
# peft's ties: the same baselines the CPU benchmark times (benchmarks/bench_cpu.py).
from bench_cpu import run_mergekit as mergekit_ties  # noqa: E402
from bench_cpu import run_peft as peft_ties  # noqa: E402


# ----------------------------------------------------------------------------- fastmerge
def fastmerge_timings(backend: str, base, models, density: float, reps: int) -> dict:
    import fastmerge as fm
    from fastmerge import ops
    from fastmerge.backends import get_backend
    from fastmerge.methods import resolve_spec
    from fastmerge.plan import plan_tensor
    from fastmerge.selection import Chunk

    name = "model.layers.0.mlp.up_proj.weight"
    n = len(models)
    be = get_backend(backend, base.device)
    spec = resolve_spec("ties", n, density=density)
    chunk = Chunk(base, models, [], 0, name)
    src = lambda: [chunk]  # noqa: E731
    res = {}
    res["full"] = cuda_time(lambda: fm.merge_tensors(base, models, "ties", density=density,
                                                     backend=backend, tensor_name=name), reps)
    res["select"] = cuda_time(lambda: plan_tensor(spec, src, be, base.numel(), name), reps)
    plan = plan_tensor(spec, src, be, base.numel(), name).on(base.device)
    res["merge"] = cuda_time(lambda: be.merge(chunk, plan, torch.bfloat16), reps)
    # primitive ops alone (no host copies)
    targets = torch.tensor([[i, 0] for i in range(n)], dtype=torch.int64, device=base.device)
    counts = torch.zeros(n, ops.NUM_BINS, dtype=torch.int64, device=base.device)
    sums = torch.zeros(n, ops.NUM_BINS, dtype=torch.float64, device=base.device)
    res["op_score_histogram"] = cuda_time(
        lambda: be.score_histogram(base, models, [], 0, targets, 0, counts, sums), reps)
    stats = torch.zeros(n, 3, dtype=torch.float64, device=base.device)
    res["op_model_stats"] = cuda_time(
        lambda: be.model_stats(base, models, [], 0, plan.fparams, plan.iparams, 1.0, 0, stats),
        reps)
    nonfinite = torch.zeros(n, dtype=torch.int64, device=base.device)
    res["op_fused_merge"] = cuda_time(
        lambda: be.fused_merge(base, models, [], plan.fparams, plan.iparams, *plan.op_args(), 0,
                               torch.bfloat16, nonfinite), reps)
    out = fm.merge_tensors(base, models, "ties", density=density, backend=backend,
                           tensor_name=name)
    return res, out


def run_gpu(args) -> list[str]:
    from fastmerge.backends import AUTO_PREFERENCE, availability
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth(args.reps)
    lines = [f"# fastmerge GPU benchmark", "",
             f"- device: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
             f"{platform.platform()}",
             f"- measured device copy bandwidth: {bw / GB:.0f} GB/s (2 GiB D2D copy, read + "
             f"write)",
             f"- TIES, density {args.density}, bf16 in and out, median of {args.reps} runs; "
             f"times in ms", ""]
    backends = []
    for b in args.backends.split(","):
        ok, why = availability(b)
        if ok:
            backends.append(b)
        else:
            lines.append(f"- backend {b} skipped: {why}")
    lines += ["", "| shape | N | backend | full TIES | selection | merge pass | merge GB/s | "
              "% of copy | vs mergekit | vs peft | max |diff| vs torch |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    op_totals = {op: {b: 0.0 for b in backends} for op in OPS}
    full_totals = {b: 0.0 for b in backends}
    for (r, c) in parse_shapes(args.shapes):
        numel = r * c
        for n in [int(x) for x in args.n.split(",")]:
            torch.manual_seed(0)
            try:
                base = torch.randn(r, c, device="cuda").to(torch.bfloat16)
                models = [(base.float() + 0.01 * torch.randn(r, c, device="cuda"))
                          .to(torch.bfloat16) for _ in range(n)]
            except torch.OutOfMemoryError:
                lines.append(f"| {r}x{c} | {n} | (inputs do not fit) |||||||||")
                torch.cuda.empty_cache()
                continue
            peers = {}
            for peer, fn in (("mergekit", mergekit_ties), ("peft", peft_ties)):
                try:
                    peers[peer] = cuda_time(lambda: fn(base, models, args.density),
                                            max(1, args.reps // 2))
                except torch.OutOfMemoryError:
                    peers[peer] = None
                torch.cuda.empty_cache()
            t = traffic(numel, n)
            results, outs = {}, {}
            for b in backends:
                try:
                    results[b], outs[b] = fastmerge_timings(b, base, models, args.density,
                                                            args.reps)
                except torch.OutOfMemoryError:
                    lines.append(f"| {r}x{c} | {n} | {b} | OOM ||||||||")
                    torch.cuda.empty_cache()
            ref_out = outs.get("torch", next(iter(outs.values()), None))
            for b, res in results.items():
                diff = (outs[b].float() - ref_out.float()).abs().max().item()
                gbs = t["merge"] / res["merge"]
                vs = {p: (f"{peers[p] / res['full']:.1f}x" if peers[p] else "OOM")
                      for p in peers}
                lines.append(
                    f"| {r}x{c} | {n} | {b} | {res['full'] * 1e3:.3f} | "
                    f"{res['select'] * 1e3:.3f} | {res['merge'] * 1e3:.3f} | {gbs / GB:.0f} | "
                    f"{100 * gbs / bw:.0f}% | {vs['mergekit']} | {vs['peft']} | {diff:.3g} |")
                for op in OPS:
                    op_totals[op][b] += res[f"op_{op}"]
                full_totals[b] += res["full"]
            del outs, ref_out
            for p, v in peers.items():
                lines.append(f"| {r}x{c} | {n} | {p} | "
                             f"{'OOM' if v is None else f'{v * 1e3:.3f}'} ||||||||")
            del base, models
            torch.cuda.empty_cache()
    lines += ["", "## Backend per op (sum of the op's times over every shape and N)", "",
              "| op | " + " | ".join(backends) + " | fastest |",
              "|---|" + "---|" * (len(backends) + 1)]
    for op in OPS:
        row = op_totals[op]
        best = min(row, key=row.get) if row else "-"
        lines.append(f"| {op} | " + " | ".join(f"{row[b] * 1e3:.2f} ms" for b in backends)
                     + f" | {best} |")
    order = tuple(sorted(full_totals, key=full_totals.get))
    if "torch" not in order:
        order = order + ("torch",)
    lines += ["", f"Suggested: `AUTO_PREFERENCE[\"cuda\"] = {order!r}` (by total full-TIES time; "
              f"currently {AUTO_PREFERENCE.get('cuda')!r}).",
              "Goals: merge pass >= 85% of the copy bandwidth; full TIES >= 30x mergekit."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--n", default="2,4,8")
    ap.add_argument("--backends", default="cuda,triton,torch")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu.md"))
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    ns = [int(x) for x in args.n.split(",")]
    if torch.cuda.is_available():
        lines = run_gpu(args)
    else:
        lines = ["# fastmerge GPU benchmark", "",
                 "**Nothing has run on a GPU yet.** `python benchmarks/gpu.py` was run on a "
                 f"machine without a CUDA device ({platform.platform()}, torch "
                 f"{torch.__version__}); the table below is a PROJECTION from the bytes each "
                 "pass must move, not a measurement. Run the same command on a GPU to replace "
                 "this file with measured numbers (copy bandwidth, per-backend selection / "
                 "merge-pass times, GB/s, speedups over mergekit 0.1.5 and peft, and the "
                 "suggested AUTO_PREFERENCE).", ""]
        lines += projection(shapes, ns, args.bandwidth_tbs)
        lines += ["", "Passes per TIES: level-0 histogram, level-1 histogram (both read base + "
                  "N models), merge (reads base + N models, writes the output).",
                  f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
