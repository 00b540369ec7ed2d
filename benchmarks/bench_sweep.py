"""Sweep benchmark: ``fastmerge sweep`` of K grid points vs a loop of K ``fastmerge merge`` runs
vs the sweep's floor (read every input once from a cold page cache + write and fsync the K
outputs' bytes, reported as its two parts), side by side in one run. Inputs from
benchmarks/make_checkpoints.py (bf16), cache eviction and the floor from bench_large.py.
Results in benchmarks/results/sweep.md, plot in docs/sweep.png.

    python benchmarks/bench_sweep.py --size 0.2b --workdir /data/fm-bench
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_large as bl  # noqa: E402
import make_checkpoints as mc  # noqa: E402

GRID = ["density=0.3,0.6", "lambda=0.8,1.0"]   # K = 4 points by default
METHOD = "ties"


def write_config(path: Path, base: Path, models: list) -> None:
    cfg = {"merge_method": METHOD, "base_model": str(base),
           "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
                      for m in models], "dtype": "bfloat16"}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def point_configs(cfg_path: Path, grid: list, workdir: Path) -> list:
    """Each point's config, for the loop of merges (the sweep's own grid expansion)."""
    from fastmerge.recipe.config import load_config
    from fastmerge.recipe.grid import expand
    base = load_config(cfg_path)
    out = []
    for p in expand(base.raw, grid, base.base_dir):
        path = workdir / f"point-{p.name}.yml"
        path.write_text(yaml.safe_dump(p.raw, sort_keys=False))
        out.append(path)
    return out


def fastmerge_cmd(*args) -> list:
    return [sys.executable, "-c", bl.LAUNCH, *map(str, args)]


def run(args) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ck = work / f"inputs-{args.size}"
    if not (ck / "base").exists():
        mc.make_checkpoints(ck, args.size, fine_tunes=args.fine_tunes)
    models = sorted(ck.glob("ft*"))
    files = bl.files_under([ck / "base", *models])
    in_bytes = sum(f.stat().st_size for f in files)
    cfg = work / "sweep.yml"
    write_config(cfg, ck / "base", models)
    points = point_configs(cfg, args.grid, work)
    k = len(points)
    out_bytes = k * sum(f.stat().st_size for f in files if f.parent.name == "base")
    load = bl.load_avg()
    floor = bl.measure_floor(files, out_bytes, work)
    rows = []
    # the sweep: one read
    out = work / "sweep-out"
    shutil.rmtree(out, ignore_errors=True)
    bl.evict(files)
    grid_args = [x for g in args.grid for x in ("--grid", g)]
    res = bl.run_measured(fastmerge_cmd("sweep", cfg, out, *grid_args, "--quiet",
                                        "--memory-budget", args.memory_budget))
    if res["rc"]:
        raise SystemExit(f"sweep failed: {res['err']}")
    rows.append(("fastmerge sweep", res["seconds"] + res["flush"], res["peak_rss"]))
    shutil.rmtree(out, ignore_errors=True)
    # the loop: K merges, each from a cold cache (what a machine without room for the inputs
    # in RAM sees)
    total, peak = 0.0, 0
    for p in points:
        o = work / "loop-out"
        shutil.rmtree(o, ignore_errors=True)
        bl.evict(files)
        res = bl.run_measured(fastmerge_cmd("merge", p, o, "--quiet", "--memory-budget",
                                            args.memory_budget))
        if res["rc"]:
            raise SystemExit(f"merge failed: {res['err']}")
        total += res["seconds"] + res["flush"]
        peak = max(peak, res["peak_rss"])
        shutil.rmtree(o, ignore_errors=True)
    rows.append((f"loop of {k} x fastmerge merge", total, peak))
    load = max(load, bl.load_avg())
    report(args, k, in_bytes, out_bytes, floor, rows, load)
    if not args.keep:
        shutil.rmtree(ck, ignore_errors=True)
    return 0


def report(args, k, in_bytes, out_bytes, floor, rows, load) -> None:
    f = floor["floor"]
    lines = [f"# Sweep: {k} points from one read ({args.size}, {METHOD}, grid "
             f"{' × '.join(args.grid)})", "",
             f"Machine: {bl.machine_short()}; {time.strftime('%Y-%m-%d')}; memory budget "
             f"{args.memory_budget}; inputs {in_bytes / 1e9:.2f} GB (base + "
             f"{args.fine_tunes} fine-tunes), outputs {k} × {out_bytes / k / 1e9:.2f} GB.", "",
             *bl.busy_note(load),
             "Every run starts from a cold page cache (posix_fadvise DONTNEED on every input); "
             "times include the sync of what each run left dirty.", "",
             "| run | seconds | × floor | peak RSS |", "|---|---:|---:|---:|",
             f"| floor: read inputs once | {floor['read']:.2f} | | |",
             f"| floor: write + fsync {k} outputs | {floor['write']:.2f} | | |",
             f"| **floor (sum)** | **{f:.2f}** | 1.00 | |"]
    for name, secs, rss in rows:
        lines.append(f"| {name} | {secs:.2f} | {secs / f:.2f} | {rss / 2 ** 30:.2f} GiB |")
    lines.append("")
    path = bl.REPO / "benchmarks" / "results" / "sweep.md"
    path.write_text(bl.keep_notes(path, "\n".join(lines)))
    plot(rows, floor, bl.REPO / "docs" / "sweep.png", lines[0][2:])
    print("\n".join(lines))


def plot(rows, floor, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 3))
    names = ["floor"] + [r[0] for r in rows]
    ax.barh(0, floor["read"], color="tab:blue", label="read inputs once")
    ax.barh(0, floor["write"], left=floor["read"], color="tab:orange",
            label="write + fsync outputs")
    for i, (_, secs, _) in enumerate(rows, 1):
        ax.barh(i, secs, color="tab:green")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("seconds (cold cache)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="0.2b", choices=list(mc.SIZES))
    p.add_argument("--workdir", default="/tmp/fastmerge-bench-sweep",
                   help="on a disk, not tmpfs (the page cache is what is evicted)")
    p.add_argument("--grid", action="append", default=None, help=f"default: {GRID}")
    p.add_argument("--fine-tunes", type=int, default=2)
    p.add_argument("--memory-budget", default="4GiB")
    p.add_argument("--keep", action="store_true", help="keep the generated inputs")
    args = p.parse_args(argv)
    args.grid = args.grid or GRID
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
