"""`fastmerge merge` vs `mergekit-yaml` on mergekit's own methods: wall time and peak RSS.

Synthetic Llama-shaped bf16 checkpoints (benchmarks/make_checkpoints.py: base + 2 fine-tunes,
~0.2B parameters by default) are made once; each method's config then runs through both CLIs,
each run in a fresh process (its own peak RSS), alternating, ``--repeats`` times (the best
run counts). ``passthrough`` copies one whole model, beside ``cp`` of its files;
``frankenmerge`` is a ``slices:`` passthrough of the first two thirds of one model's layers
then the last two thirds (layers [0, 2L/3) + [L/3, L): 4L/3 output layers), beside ``cp`` of
as many bytes (the output it wrote, copied).

    python benchmarks/bench_mergekit_methods.py [--workdir /tmp/fm_mkm] [--size 0.2b]
        [--methods slerp,model_stock,della,passthrough,frankenmerge] [--repeats 1]
        [--out benchmarks/results/mergekit_methods.md] [--plot docs/mergekit_methods.png]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))


def configs(ck: Path) -> dict:
    import json
    base, ft1, ft2 = str(ck / "base"), str(ck / "ft1"), str(ck / "ft2")
    n = json.loads((ck / "ft1" / "config.json").read_text())["num_hidden_layers"]
    return {
        "frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": ft1, "layer_range": [0, 2 * n // 3]}]},
            {"sources": [{"model": ft1, "layer_range": [n // 3, n]}]}]},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": ft1}],
                  "parameters": {"t": [0.0, 0.5, 1.0]}},
        "model_stock": {"merge_method": "model_stock", "base_model": base,
                        "models": [{"model": ft1}, {"model": ft2}]},
        "della": {"merge_method": "della", "base_model": base,
                  "models": [{"model": ft1, "parameters": {"weight": 0.6, "density": 0.5,
                                                           "epsilon": 0.1}},
                             {"model": ft2, "parameters": {"weight": 0.5, "density": 0.5,
                                                           "epsilon": 0.1}}]},
        "passthrough": {"merge_method": "passthrough", "models": [{"model": ft1}]},
    }


def timed(cmd: list, env=None) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one command in a fresh process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {err[-800:]}")
    return wall, usage.ru_maxrss / 2 ** 20


def bin_of(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run(args) -> list:
    import yaml
    from make_checkpoints import make_checkpoints
    work = Path(args.workdir)
    ck = work / f"ckpt_{args.size}"
    if not (ck / "ft2").exists():
        make_checkpoints(ck, size=args.size, fine_tunes=2)
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    # fastmerge's bytecode compiled once, as pip does for mergekit's: without it every run
    # compiles the modules it imports (with PYTHONDONTWRITEBYTECODE set, on every run)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "fastmerge")],
                   check=True, env=env)
    for method in args.methods:
        cfg = configs(ck)[method]
        path = work / f"{method}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        best = {}
        for _ in range(args.repeats):
            for tool, cmd in (
                    ("fastmerge", [sys.executable, "-m", "fastmerge", "merge", str(path),
                                   str(work / "out_fm"), "--overwrite", "--quiet"]),
                    ("mergekit", [bin_of("mergekit-yaml"), str(path), str(work / "out_mk"),
                                  "--no-copy-tokenizer"])):
                # both write into a fresh directory: deleting the last output (fastmerge's
                # --overwrite) is no part of either merge; fastmerge's stays for the cp row
                shutil.rmtree(work / ("out_fm" if tool == "fastmerge" else "out_mk"),
                              ignore_errors=True)
                wall, rss = timed(cmd, env)
                if tool not in best or wall < best[tool][0]:
                    best[tool] = (wall, rss)
        if method in ("passthrough", "frankenmerge"):
            # the bytes it copies: the whole model, or (frankenmerge) the output it wrote
            shutil.rmtree(work / "out_cp", ignore_errors=True)
            what = ck / "ft1" if method == "passthrough" else work / "out_fm"
            best["cp"] = timed(["cp", "-r", str(what), str(work / "out_cp")])
        rows.append((method, best))
        print(method, {k: f"{v[0]:.2f} s, {v[1]:.2f} GiB" for k, v in best.items()},
              flush=True)
    return rows


def write(rows, args) -> None:
    from machine_info import describe
    lines = [f"# fastmerge merge vs mergekit-yaml: mergekit's own methods ({args.size})", "",
             f"Machine: {describe()}.", "",
             f"Synthetic bf16 checkpoints (benchmarks/make_checkpoints.py --size {args.size}, "
             f"base + 2 fine-tunes); best of {args.repeats} run(s) each, fresh processes, "
             f"outputs bf16. `python benchmarks/bench_mergekit_methods.py`.", "",
             "| method | fastmerge s | mergekit s | speed-up | fastmerge RSS GiB | "
             "mergekit RSS GiB |", "|---|---|---|---|---|---|"]
    for method, best in rows:
        fm, mk = best["fastmerge"], best["mergekit"]
        lines.append(f"| {method} | {fm[0]:.2f} | {mk[0]:.2f} | {mk[0] / fm[0]:.1f}x | "
                     f"{fm[1]:.2f} | {mk[1]:.2f} |")
        if "cp" in best:
            lines.append(f"| (cp of the same files) | {best['cp'][0]:.2f} | | | | |")
    lines += ["", "passthrough copies one whole model; frankenmerge is a `slices:` "
              "passthrough of layers [0, 2L/3) + [L/3, L) of one model (4L/3 output layers), "
              "its cp row a copy of as many bytes (the output).", ""]
    from bench_large import keep_notes
    Path(args.out).write_text(keep_notes(Path(args.out), "\n".join(lines)))
    plot(rows, args.size, args.plot)


def plot(rows, size: str, path) -> None:
    """Wall time per method and tool, titled with the machine (every figure names it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from machine_info import cpu_model
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [b["fastmerge"][0] for _, b in rows], 0.4, label="fastmerge")
    ax.bar([x + 0.2 for x in xs], [b["mergekit"][0] for _, b in rows], 0.4,
           label="mergekit-yaml 0.1.5")
    ax.set_xticks(list(xs), [m for m, _ in rows])
    ax.set_ylabel("wall time, s")
    ax.set_title(f"mergekit's methods, {size} bf16 checkpoints\n"
                 f"({cpu_model()}, {os.cpu_count()} cores)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/fm_mkm")
    p.add_argument("--size", default="0.2b")
    p.add_argument("--methods", default="slerp,model_stock,della,passthrough,frankenmerge")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/mergekit_methods.md"))
    p.add_argument("--plot", default=str(ROOT / "docs/mergekit_methods.png"))
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    work = Path(args.workdir)
    made = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    try:
        write(run(args), args)
    finally:  # outputs and configs always; the checkpoints unless --keep (disk is limited)
        for name in ("out_fm", "out_mk", "out_cp") + (() if args.keep else
                                                       (f"ckpt_{args.size}",)):
            shutil.rmtree(work / name, ignore_errors=True)
        for cfg in work.glob("*.yml"):
            cfg.unlink()
        if made and not any(work.iterdir()):
            work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
