"""Sweep benchmark: ``fastmerge sweep`` of K grid points vs a loop of K ``fastmerge merge`` runs
vs the sweep's floor (read every input once from a cold page cache + write and fsync the K
outputs' bytes, reported as its two parts), side by side in one run. Inputs from
benchmarks/make_checkpoints.py (bf16), cache eviction (checked: a cold read against a warm
one) and the floor from bench_large.py. Results in benchmarks/results/sweep.md, plot in
docs/sweep.png.

    python benchmarks/bench_sweep.py --size 0.2b --workdir /data/fm-bench
    python benchmarks/bench_sweep.py --size 7b --workdir /data/fm-bench       # K = 3

At 7B a base, 2 fine-tunes and 3 outputs take 81 GB: the large sizes keep their tensor shapes
but get as many layers as the free disk of WORKDIR holds with 8 GB to spare (``--layers N``
to choose; the table says how many). ``--dry-run`` prints that plan and exits.
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
GRID_LARGE = ["density=0.2,0.5,0.8"]           # K = 3 at 7B and above (disk space)
LARGE = ("7b", "13b", "70b-layers")
METHOD = "ties"
SPARE = 8 * 10 ** 9      # bytes left free on the workdir's disk at the run's peak


def grid_points(grid: list) -> int:
    k = 1
    for g in grid:
        k *= len(g.partition("=")[2].split(","))
    return k


def plan_layers(size: str, layers, fine_tunes: int, k: int, free: int, have: int = 0) -> int:
    """The layer count of the run: ``layers`` if given, else the size's own for small sizes and
    as many as the disk holds for the large ones. At the peak the disk holds the inputs (1 +
    fine_tunes checkpoints; ``have`` bytes of them already there) and K outputs (the floor's
    write file, then the sweep's outputs), with SPARE bytes left."""
    copies = 1 + fine_tunes + k
    room = free + have - SPARE
    full = mc.SIZES[size][0]
    if layers is None and size not in LARGE:
        layers = full
    if layers is not None:
        need = copies * 2 * mc.param_count(size, layers)
        if need > room:
            raise mc.UserError(f"{size} with {layers} layers: {copies} checkpoints need "
                               f"{need / 1e9:.1f} GB but the workdir has {free / 1e9:.1f} GB "
                               f"free ({SPARE / 1e9:.0f} GB kept spare); use --layers")
        return layers
    fit = mc.layers_that_fit(size, room, copies)
    if fit < 1:
        raise mc.UserError(f"{size}: not even one layer's {copies} checkpoints fit in "
                           f"{free / 1e9:.1f} GB free ({SPARE / 1e9:.0f} GB kept spare)")
    return fit


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


def inputs_dir(work: Path, size: str, layers: int) -> Path:
    return work / f"inputs-{size}-{layers}layers"


def run(args) -> int:
    work = Path(args.workdir)
    made_work = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    made: list = []   # what this run wrote: removed however it ends (--keep: not the inputs)
    try:
        return _run(args, work, made)
    finally:
        for path in made:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if made_work and not any(work.iterdir()):
            work.rmdir()


def _run(args, work: Path, made: list) -> int:
    k = grid_points(args.grid)
    full = mc.SIZES[args.size][0]
    have = {n: sum(f.stat().st_size for f in bl.files_under([inputs_dir(work, args.size, n)]))
            for n in range(1, full + 1) if (inputs_dir(work, args.size, n) / "base").exists()}
    free = shutil.disk_usage(work).free
    # inputs kept by an earlier run (--keep) are reused where they still leave room
    want = args.layers if args.layers is not None or not have else max(have)
    layers = plan_layers(args.size, want, args.fine_tunes, k, free, have.get(want, 0))
    per = 2 * mc.param_count(args.size, layers)
    plan = (f"{args.size} shapes, {layers} of {full} layers: {1 + args.fine_tunes} inputs + "
            f"{k} outputs x {per / 1e9:.2f} GB; {free / 1e9:.1f} GB free in {work}")
    print(plan, flush=True)
    if args.dry_run:
        return 0
    ck = inputs_dir(work, args.size, layers)
    if not (ck / "base").exists():
        if not args.keep:
            made.append(ck)
        mc.make_checkpoints(ck, args.size, layers=layers, fine_tunes=args.fine_tunes)
    models = sorted(ck.glob("ft*"))
    files = bl.files_under([ck / "base", *models])
    in_bytes = sum(f.stat().st_size for f in files)
    cfg = work / "sweep.yml"
    made.append(cfg)
    write_config(cfg, ck / "base", models)
    points = point_configs(cfg, args.grid, work)
    made.extend(points)
    out_bytes = k * sum(f.stat().st_size for f in files if f.parent.name == "base")
    load = bl.load_avg()
    evicted = bl.check_eviction(files)
    floor = bl.measure_floor(files, out_bytes, work)
    rows = []
    # the sweep: one read
    out = work / "sweep-out"
    made.append(out)
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
    # in RAM sees); one output on disk at a time, less than the sweep's K
    if not args.no_loop:
        total, peak = 0.0, 0
        for p in points:
            o = work / "loop-out"
            made.append(o)
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
    report(args, k, layers, in_bytes, out_bytes, floor, evicted, rows, load)
    return 0


def report(args, k, layers, in_bytes, out_bytes, floor, evicted, rows, load) -> None:
    f = floor["floor"]
    full = mc.SIZES[args.size][0]
    shape = f"{args.size}" if layers == full else \
        f"{args.size}-shaped, {layers} of {full} layers"
    ev = (f"Page-cache eviction checked: a cold read of {evicted['bytes'] / 1e9:.2f} GB took "
          f"{evicted['cold']:.2f} s, the warm read after it {evicted['warm']:.2f} s"
          + ("" if evicted["resident_after_evict"] is None else
             f", {evicted['resident_after_evict']} bytes resident after eviction (fincore)")
          + (": eviction works." if evicted["works"] else
             ": **eviction did NOT work here; the cold-cache figures are not cold**."))
    lines = [f"# Sweep: {k} points from one read ({shape}, {METHOD}, grid "
             f"{' × '.join(args.grid)})", "",
             f"Machine: {bl.machine_short()}; {time.strftime('%Y-%m-%d')}; memory budget "
             f"{args.memory_budget}; inputs {in_bytes / 1e9:.2f} GB (base + "
             f"{args.fine_tunes} fine-tunes, {layers} layers), outputs {k} × "
             f"{out_bytes / k / 1e9:.2f} GB; load average up to {load:.1f}.", "",
             *bl.busy_note(load),
             "Every run starts from a cold page cache (posix_fadvise DONTNEED on every input); "
             "times include the sync of what each run left dirty. " + ev, "",
             "| run | seconds | × floor | peak RSS |", "|---|---:|---:|---:|",
             f"| floor: read inputs once | {floor['read']:.2f} | | |",
             f"| floor: write + fsync {k} outputs | {floor['write']:.2f} | | |",
             f"| **floor (sum)** | **{f:.2f}** | 1.00 | |"]
    for name, secs, rss in rows:
        lines.append(f"| {name} | {secs:.2f} | {secs / f:.2f} | {rss / 2 ** 30:.2f} GiB |")
    if args.no_loop:
        lines.append(f"| loop of {k} x fastmerge merge | not run (--no-loop) | | |")
    lines.append("")
    path = Path(args.results)
    path.write_text(bl.keep_notes(path, "\n".join(lines)))
    plot(rows, floor, Path(args.plot), plot_title(lines[0][2:]))
    print("\n".join(lines))


def plot_title(heading: str) -> str:
    """The table's heading on two lines, with the machine (every figure names it)."""
    head, _, rest = heading.partition(" (")
    return f"{head}\n({rest}; {bl.machine_short()})" if rest else \
        f"{head}\n({bl.machine_short()})"


def plot(rows, floor, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="0.2b", choices=list(mc.SIZES))
    p.add_argument("--layers", type=int, default=None,
                   help="layers of the checkpoints (default: the size's own; at 7b and above "
                        "as many as the free disk holds, 8 GB spare)")
    p.add_argument("--workdir", default="/tmp/fastmerge-bench-sweep",
                   help="on a disk, not tmpfs (the page cache is what is evicted)")
    p.add_argument("--grid", action="append", default=None,
                   help=f"default: {GRID}; {GRID_LARGE} at {', '.join(LARGE)}")
    p.add_argument("--fine-tunes", type=int, default=2)
    p.add_argument("--memory-budget", default="4GiB")
    p.add_argument("--no-loop", action="store_true", help="skip the loop of K merges")
    p.add_argument("--keep", action="store_true", help="keep the generated inputs")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (layers, sizes, free disk) and exit")
    p.add_argument("--results", default=str(bl.REPO / "benchmarks" / "results" / "sweep.md"),
                   help="the markdown table to (re)write")
    p.add_argument("--plot", default=str(bl.REPO / "docs" / "sweep.png"))
    args = p.parse_args(argv)
    args.grid = args.grid or (GRID_LARGE if args.size in LARGE else GRID)
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be at least 1, got {args.layers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except mc.UserError as exc:
        print(f"bench_sweep: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
