"""Large-model benchmark: ``fastmerge merge`` of a 7B-shaped base + 2 fine-tunes, every method
family, side by side with the physical floor (read every input once from a cold page cache +
write and fsync the output's bytes) and, optionally, ``mergekit-yaml``. Results in
benchmarks/results/large.md, plot in docs/large_merge.png.

    python benchmarks/bench_large.py --with-mergekit          # 7B: ~55 GB of disk, ~1 h
    python benchmarks/bench_large.py --size 0.5b --with-mergekit   # a check of the script

Inputs come from benchmarks/make_checkpoints.py (bf16, 5 GB shards) in --workdir (on a disk,
not tmpfs: the page cache is what is evicted) and are deleted at the end unless --keep; every
merge output is deleted once measured. Before each measured run: ``sync``, then every input
file is evicted from the page cache (posix_fadvise DONTNEED; whether that worked is checked by
timing a second read, and with ``fincore`` where installed). Each run is a subprocess under a
fresh wrapper process: wall time and the peak RSS of the command (getrusage of the children),
then the time ``sync`` takes to put what the command left in the page cache on disk (fastmerge
fsyncs its output; mergekit does not). The engine's goal: every method within 1.2x of the
floor at a 4 GiB budget, still at 2 GiB.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
# E402 is wrong here: the import needs the path above (tests load this file by its path)
import make_checkpoints as mc  # noqa: E402

# method -> per-model parameters (mergekit syntax), every family fastmerge has
METHODS = {
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "breadcrumbs_ties": {"weight": 0.5, "density": 0.5, "gamma": 0.01},
    "consensus_ties": {"weight": 0.5, "density": 0.5},
    "slerp": None,  # two models: the fine-tunes, t = 0.5 (reads 2 of the 3 inputs)
}
SLERP_T = 0.5
MERGEKIT_SEED = 0
WRAPPER = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
           "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,"
           " text=True); dt = time.perf_counter() - t; "
           "print(json.dumps({'rc': r.returncode, 'seconds': dt, 'err': r.stderr[-2000:], "
           "'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")
# runs ``fastmerge ARGS`` in this process and says on stderr whether it imported torch: the
# torch-free path hands a step _core does not bind (the radix selection of a top-k tensor
# larger than one chunk or after a window miss) to backend "cpu", for that tensor only
LAUNCH = ("import os, sys\nfrom fastmerge.cli import main\nrc = main(sys.argv[1:])\n"
          "print('\\nfastmerge-imported-torch:', 'torch' in sys.modules, file=sys.stderr)\n"
          "sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)  # as fastmerge.cli.run\n")
READ_CHUNK = 64 << 20
POPULATE_WINDOW = 256 << 20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
GiB = 2 ** 30
NOTES = "<!-- notes: kept when the script rewrites this file -->"


def parse_budget(text: str) -> int:
    try:
        return mc.parse_bytes(text)
    except mc.UserError:
        raise mc.UserError(f"--budgets: cannot read {text!r} (e.g. 4GiB)") from None


def fastmerge_methods() -> set:
    from fastmerge.methods import ALIASES
    from fastmerge.methods import METHODS as FM_METHODS
    from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
    return set(FM_METHODS) | set(ALIASES) | set(MERGEKIT_METHODS)


def files_under(dirs) -> list:
    return sorted(f for d in dirs for f in Path(d).rglob("*") if f.is_file())


def evict(files) -> None:
    """sync, then drop every file's pages from the page cache (clean pages only: hence sync)."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files) -> int:
    """Brings every file into memory once, one after another, the fastest way measured here:
    mapped 256 MiB at a time and populated (MADV_POPULATE_READ; 2.0 GB/s cold where 64 MiB
    preadv calls gave 0.9 and 8 MiB 1.6), else 8 MiB preadv. Returns the bytes read."""
    total = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            total += _populate_file(fd, size) if size else 0
        finally:
            os.close(fd)
    return total


def _populate_file(fd: int, size: int) -> int:
    try:
        for off in range(0, size, POPULATE_WINDOW):
            with mmap.mmap(fd, min(POPULATE_WINDOW, size - off), prot=mmap.PROT_READ,
                           offset=off) as mm:
                mm.madvise(MADV_POPULATE_READ)
        return size
    except (OSError, ValueError):  # no MADV_POPULATE_READ (Linux < 5.14)
        buf, done = memoryview(bytearray(8 << 20)), 0
        while n := os.preadv(fd, [buf], done):
            done += n
        return done


_LIBC = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def write_floor(path: Path, nbytes: int) -> float:
    """Seconds to write nbytes (64 MiB writes of random bytes, the writeback of each started at
    once with sync_file_range, as fastmerge's writer does) and fsync them; deletes the file."""
    block = os.urandom(READ_CHUNK)
    start_writeback = getattr(_LIBC, "sync_file_range", None)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done = 0
        while done < nbytes:
            n = os.write(fd, block[:min(nbytes - done, len(block))])
            if start_writeback is not None:  # without it the page cache fills first, then waits
                start_writeback(fd, ctypes.c_int64(done), ctypes.c_int64(n),
                                _SYNC_FILE_RANGE_WRITE)
            done += n
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def resident_bytes(files) -> int | None:
    """Bytes of these files in the page cache per util-linux fincore; None without it."""
    exe = shutil.which("fincore")
    if not exe or not files:
        return None
    r = subprocess.run([exe, "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                       check=False, capture_output=True, text=True)
    if r.returncode:
        return None
    return sum(int(x) for x in r.stdout.split())


def check_eviction(files) -> dict:
    """Times a cold read (after evict) and a second, warm one: eviction works when the cold read
    is clearly slower (and, with fincore, when nothing stays resident). On the first files up to
    a quarter of the RAM, so that the second read can be warm."""
    room = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    some, size = [], 0
    for f in files:
        if some and size + f.stat().st_size > room:
            break
        some.append(f)
        size += f.stat().st_size
    files = some
    evict(files)
    resident = resident_bytes(files)
    t = time.perf_counter()
    n = read_all(files)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    read_all(files)
    warm = time.perf_counter() - t
    evict(files)
    works = cold > 1.5 * warm and not resident
    return {"bytes": n, "cold": cold, "warm": warm, "resident_after_evict": resident,
            "works": works}


def measure_floor(files, out_bytes: int, workdir: Path) -> dict:
    evict(files)
    t = time.perf_counter()
    n = read_all(files)
    read = time.perf_counter() - t
    write = write_floor(workdir / "floor-write.bin", out_bytes)
    return {"read": read, "read_bytes": n, "write": write, "write_bytes": out_bytes,
            "floor": read + write}


def run_measured(cmd: list) -> dict:
    # its own process group, so that an interrupted benchmark stops the command it runs too
    p = subprocess.Popen([sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        stdout, _ = p.communicate()
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    res = json.loads(stdout.strip().splitlines()[-1])
    t = time.perf_counter()
    os.sync()  # what the command left dirty in the page cache is part of writing the output
    res["flush"] = time.perf_counter() - t
    return res


def write_config(path: Path, method: str, base: Path, models: list) -> None:
    if METHODS[method] is None:  # slerp: between the first two fine-tunes, as mergekit's examples
        cfg = {"merge_method": method, "base_model": str(models[0]),
               "models": [{"model": str(m)} for m in models[:2]],
               "parameters": {"t": SLERP_T}, "dtype": "bfloat16"}
    else:
        cfg = {"merge_method": method, "base_model": str(base),
               "models": [{"model": str(m), "parameters": dict(METHODS[method])}
                          for m in models], "dtype": "bfloat16"}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def read_fraction(method: str, base: Path, models: list) -> float:
    """Share of the input bytes the method reads (slerp reads two models): its floor reads only
    those, at the floor's measured read speed."""
    if METHODS[method] is not None:
        return 1.0
    everything = sum(f.stat().st_size for f in files_under([base, *models]))
    return sum(f.stat().st_size for f in files_under(models[:2])) / everything


def row_floor(floor: dict, row: dict) -> float:
    return floor["read"] * row.get("read_fraction", 1.0) + floor["write"]


def merge_path(cfg_path: Path, stderr: str) -> str:
    """native (without torch), engine (why_not chose a torch backend), or native + cpu (the
    torch-free path ran some tensors' steps on backend "cpu": the run imported torch)."""
    from fastmerge.pipeline import load_config
    from fastmerge.pipeline.native import why_not
    if why_not(load_config(cfg_path), "cpu", "auto"):
        return "engine"
    return "native + cpu" if "fastmerge-imported-torch: True" in stderr else "native"


def needed_bytes(input_bytes: int, out_bytes: int) -> int:
    """Inputs + one output at a time (a merge's or the floor's write file) + 2 GiB of slack."""
    return input_bytes + out_bytes + 2 * GiB


def busy_note(load: float) -> list:
    cores = os.cpu_count() or 1
    if load <= cores:
        return []
    return [(f"**The machine was busy** (load average up to {load:.1f} on {cores} cores, other "
            "jobs' CPU and disk use): these numbers check the script, they do not measure "
            "fastmerge."), ""]


def keep_notes(path: Path, text: str) -> str:
    """``text`` plus the notes section of the file it replaces (from the NOTES line on)."""
    old = path.read_text() if path.exists() else ""
    return text + ("\n" + old[old.index(NOTES):] if NOTES in old else "")


def display(path) -> str:
    """A path relative to the repository where it is inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def load_avg() -> float:
    return os.getloadavg()[0]


def plot(rows: list, floor: float, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['method']} ({r['tool']}{', ' + r['budget'] if r['budget'] else ''})"
              for r in rows]
    secs = [r["seconds"] + r["flush"] for r in rows]
    colors = ["tab:blue" if r["tool"] == "fastmerge" else "tab:orange" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.6))
    ax.barh(range(len(rows)), secs, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(floor, color="k", lw=1.2, label=f"floor (read inputs + write output) {floor:.1f} s")
    ax.axvline(1.2 * floor, color="k", lw=1, ls="--", label="1.2x floor (goal)")
    if max(secs) > 20 * floor:
        ax.set_xscale("log")
    ax.set_xlabel("seconds to the output on disk (wall + sync), cold page cache")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args, info: dict, floors: list, evict_check: dict, rows: list, skipped: list,
           machine: str) -> str:
    floor = min(floors, key=lambda f: f["floor"])
    gb = 1e9
    e = evict_check
    if e["works"]:
        evict_line = (f"Eviction works here: reading {e['bytes'] / 1e9:.1f} GB of the inputs "
                      f"after eviction took "
                      f"{e['cold']:.1f} s, a second read {e['warm']:.1f} s")
    else:
        evict_line = (f"**Eviction could not be verified here** (after eviction {e['cold']:.1f} s,"
                      f" a second read {e['warm']:.1f} s): the numbers may be from a warm cache")
    if e["resident_after_evict"] is not None:
        evict_line += f"; fincore: {e['resident_after_evict'] / 2 ** 20:.0f} MiB resident after"
    lines = [
        (f"# Large merge vs the physical floor ({args.size}-shaped, base + {args.fine_tunes} "
        "fine-tunes)"), "",
        f"Machine: {machine}.", "",
        (f"Inputs: benchmarks/make_checkpoints.py --size {args.size}"
        f"{f' --layers {args.layers}' if args.layers else ''} --fine-tunes {args.fine_tunes} "
        f"--seed {args.seed}: {info['params'] / 1e9:.3f}B parameters per model, bf16, 5 GB "
        f"shards; {info['bytes'] / gb:.1f} GB in, {info['out_bytes'] / gb:.1f} GB out (bf16). "
        f"Workdir {args.workdir}. Load average at the start {floors[0]['load']:.2f} "
        "(each row gives its own)."), "",
        *busy_note(max([f["load"] for f in floors] + [r["load"] for r in rows])),
        ("Floor = reading every input once from a cold cache (256 MiB mappings populated by "
        "MADV_POPULATE_READ, one file after another) + writing the output's bytes (64 MiB "
        "writes, each one's writeback started at once) and fsync. "
        f"Measured before and after the runs: {floors[0]['floor']:.1f} s "
        f"(read {floors[0]['read']:.1f} s = {floors[0]['read_bytes'] / floors[0]['read'] / gb:.3g}"
        f" GB/s, write {floors[0]['write']:.1f} s = "
        f"{floors[0]['write_bytes'] / floors[0]['write'] / gb:.3g} GB/s) and "
        f"{floors[-1]['floor']:.1f} s; the ratios use the smaller, {floor['floor']:.1f} s. "
        f"{evict_line}."), "",
        (f"fastmerge: best of {args.reps} run(s) each, mergekit: 1. "
        "Each run: `sync`, evict the inputs, then the command under a fresh wrapper process "
        "(wall time, peak RSS of the command), then `sync` again (flush: what the command left "
        "dirty; fastmerge fsyncs its output, mergekit does not). x floor = (wall + flush) / "
        "floor. fastmerge: `fastmerge merge CONFIG OUT --memory-budget B`; mergekit: "
        f"`mergekit-yaml CONFIG OUT --random-seed {MERGEKIT_SEED}` (its defaults, CPU). "
        "Parameters: weight 0.5, density 0.5, gamma 0.01 (breadcrumbs); slerp: t = 0.5 between "
        "the first two fine-tunes, its floor reading only those two (the measured read time "
        "scaled by their share of the bytes). path: native = "
        "without torch (fastmerge/pipeline/native.py), engine = a torch backend, native + cpu "
        "= without torch except the steps _core does not bind (the selection of a top-k/band "
        "tensor larger than one chunk), run for that tensor on backend cpu."), "",
        ("| method | tool | path | budget | wall s | flush s | x floor | peak RSS GiB | "
        "RSS / budget | load |"),
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["rc"]:
            lines.append(f"| {r['method']} | {r['tool']} | {r['path']} | {r['budget'] or '-'} | "
                         f"failed (rc {r['rc']}) | | | | | {r['load']:.1f} |")
            continue
        total = r["seconds"] + r["flush"]
        rss = r["peak_rss"] / GiB
        ratio = f"{r['peak_rss'] / r['budget_bytes']:.2f}" if r["budget_bytes"] else "-"
        lines.append(f"| {r['method']} | {r['tool']} | {r['path']} | {r['budget'] or '-'} | "
                     f"{r['seconds']:.1f} | {r['flush']:.1f} | {total / row_floor(floor, r):.2f} | "
                     f"{rss:.2f} | {ratio} | {r['load']:.1f} |")
    lines.append("")
    for s in skipped:
        lines.append(f"- {s}")
    if args.size != "7b":
        lines += ["", ("The 7B-shaped run (~56 GB of disk, the machine to itself): "
                  "`python benchmarks/bench_large.py --with-mergekit`.")]
    lines += ["", (f"Goal for the engine: every method within 1.2x of the floor at a 4 GiB "
              "budget, still at 2 GiB. Plot: "
               f"{display(args.plot)}. Command: "
              f"`python benchmarks/bench_large.py {' '.join(args.argv)}`."), ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="7b", choices=[s for s in mc.SIZES])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--fine-tunes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--budgets", nargs="*", default=["4GiB", "2GiB"])
    p.add_argument("--with-mergekit", action="store_true", help="also time mergekit-yaml "
                   "(ties at 7B takes ~14 min)")
    p.add_argument("--mergekit-methods", nargs="*", default=["task_arithmetic", "ties"])
    p.add_argument("--workdir", default="/var/tmp/fastmerge-bench-large")
    p.add_argument("--reps", type=int, default=1,
                   help="runs of each fastmerge merge, the fastest reported (mergekit: 1)")
    p.add_argument("--keep", action="store_true",
                   help="keep the generated inputs (merge outputs are always deleted)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "large.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "large_merge.png"))
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # a kill (SIGTERM) unwinds like Ctrl-C: the cleanup in run() deletes what the run made
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args)
    except mc.UserError as e:
        print(f"bench_large: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise mc.UserError(f"--methods: unknown {', '.join(unknown)} (one of "
                           f"{', '.join(METHODS)})")
    budgets = [(b, parse_budget(b)) for b in args.budgets]
    if args.reps < 1:
        raise mc.UserError(f"--reps: must be at least 1, got {args.reps}")
    mergekit = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent /
                                                    "mergekit-yaml")
    if args.with_mergekit and not Path(mergekit).exists():
        raise mc.UserError("--with-mergekit: mergekit-yaml is not installed")
    work = Path(args.workdir).absolute()
    tag = f"{args.size}-{args.layers or 'all'}-ft{args.fine_tunes}-seed{args.seed}"
    inputs_dir = work / f"inputs-{tag}"
    reuse = (inputs_dir / "DONE").exists()
    in_bytes = mc.total_bytes(args.size, args.layers, args.fine_tunes)
    out_bytes = in_bytes // (1 + args.fine_tunes)
    need = needed_bytes(0 if reuse else in_bytes, out_bytes)
    there = next(p for p in [work, *work.parents] if p.exists())
    free = shutil.disk_usage(there).free
    if free < need:
        raise mc.UserError(f"{work}: {free / 1e9:.1f} GB free, the {args.size} benchmark needs "
                           f"{need / 1e9:.1f} GB (inputs {in_bytes / 1e9:.1f} GB + outputs)")
    made_work = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    from machine_info import describe
    machine = describe()
    created = not reuse
    skipped, out, cfg = [], None, None
    try:
        if reuse:
            print(f"reusing {inputs_dir}", flush=True)
            info = {"base": inputs_dir / "base",
                    "models": [inputs_dir / f"ft{i + 1}" for i in range(args.fine_tunes)],
                    "params": mc.param_count(args.size, args.layers),
                    "bytes": in_bytes}
        else:
            if inputs_dir.exists():
                raise mc.UserError(f"{inputs_dir}: exists without DONE (an interrupted run?); "
                                   "remove it")
            info = mc.make_checkpoints(inputs_dir, args.size, args.layers, args.fine_tunes,
                                       args.seed)
            (inputs_dir / "DONE").write_text("ok\n")
        info["out_bytes"] = out_bytes
        files = files_under([info["base"], *info["models"]])
        evict_check = check_eviction(files)
        print(json.dumps(evict_check), flush=True)
        floors = [{**measure_floor(files, out_bytes, work), "load": load_avg()}]
        print(json.dumps(floors[0]), flush=True)
        available = fastmerge_methods()
        rows = []
        for method in args.methods:
            if method not in available:
                skipped.append(f"{method}: not a fastmerge method; "
                               "skipped")
                continue
            cfg = work / f"{method}.yml"
            write_config(cfg, method, info["base"], info["models"])
            fraction = read_fraction(method, info["base"], info["models"])
            runs = [("fastmerge", b, bb) for b, bb in budgets]
            if args.with_mergekit and method in args.mergekit_methods:
                runs.append(("mergekit", "", 0))
            for tool, budget, budget_bytes in runs:
                out = work / f"out-{tool}-{method}"
                if out.exists():
                    raise mc.UserError(f"{out}: exists (left from another run?); remove it")
                if tool == "fastmerge":
                    cmd = [sys.executable, "-c", LAUNCH, "merge", str(cfg), str(out),
                           "--quiet", "--memory-budget", budget]
                else:
                    cmd = [mergekit, str(cfg), str(out), "--quiet", "--random-seed",
                           str(MERGEKIT_SEED)]
                res = None
                for _ in range(args.reps if tool == "fastmerge" else 1):
                    evict(files)
                    load = load_avg()
                    run = run_measured(cmd)
                    shutil.rmtree(out, ignore_errors=True)
                    if res is None or run["rc"] or \
                            run["seconds"] + run["flush"] < res["seconds"] + res["flush"]:
                        res = run
                    if run["rc"]:
                        break
                out = None
                path = merge_path(cfg, res["err"]) if tool == "fastmerge" else "-"
                row = {"method": method, "tool": tool, "budget": budget,
                       "budget_bytes": budget_bytes, "path": path, "load": load,
                       "read_fraction": fraction, **res}
                rows.append(row)
                if res["rc"]:
                    print(res["err"], file=sys.stderr)
                print(json.dumps({k: v for k, v in row.items() if k != "err"}), flush=True)
            cfg.unlink()
            cfg = None
        floors.append({**measure_floor(files, out_bytes, work), "load": load_avg()})
        print(json.dumps(floors[-1]), flush=True)
    finally:
        if out is not None:  # an interrupted run's output (the command's own, never the user's)
            shutil.rmtree(out, ignore_errors=True)
        if cfg is not None:
            cfg.unlink(missing_ok=True)
        if created and not args.keep:
            shutil.rmtree(inputs_dir, ignore_errors=True)
        if made_work and not any(work.iterdir()):
            work.rmdir()
    text = report(args, info, floors, evict_check, rows, skipped, machine)
    Path(args.out).write_text(keep_notes(Path(args.out), text))
    floor = min(f["floor"] for f in floors)
    plot([r for r in rows if not r["rc"]], floor,
         f"{args.size}-shaped base + {args.fine_tunes} fine-tunes, "
         f"{info['bytes'] / 1e9:.1f} GB in, cold cache ({machine_short()})", Path(args.plot))
    print(text)
    return 0


def machine_short() -> str:
    from machine_info import cpu_model
    return f"{cpu_model()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
