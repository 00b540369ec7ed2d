"""The GPU kit's sweep step (benchmarks/gpu_check.sh): ``fastmerge sweep`` of K = 3 TIES
points (density 0.2, 0.5, 0.8) of generated checkpoints on each GPU backend, against K
``fastmerge merge`` commands of the same points, each point checked byte for byte against its
merge. Checkpoints in host memory (/dev/shm where there is one): this times the engine, not a
disk. Writes OUTDIR/sweep.json and OUTDIR/sweep.md (gpu_check.sh appends it to SUMMARY.md).

    python benchmarks/gpu_sweep.py OUTDIR [--size 0.2b] [--backends cuda,triton] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GRID = "density=0.2,0.5,0.8"
GB = 1e9


def _command(*args) -> list:
    return [sys.executable, "-m", "fastmerge", *map(str, args)]


def _run(cmd: list) -> tuple:
    """(seconds, error line or None) of one command."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    secs = time.perf_counter() - t0
    if done.returncode:
        return secs, ((done.stderr or done.stdout).strip().splitlines() or ["?"])[-1][:200]
    return secs, None


def _same(a: Path, b: Path) -> bool:
    names = sorted(f.name for f in a.iterdir())
    return names == sorted(f.name for f in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def make_inputs(work: Path, size: str) -> tuple:
    """(config path, input bytes): a base and 2 fine-tunes of ``size`` and a TIES config."""
    ck = work / "ckpt"
    done = subprocess.run([sys.executable, str(HERE / "make_checkpoints.py"), str(ck),
                           "--size", size, "--fine-tunes", "2"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError("make_checkpoints failed: " +
                           (done.stderr.strip().splitlines() or ["?"])[-1][:200])
    models = [ck / "ft1", ck / "ft2"]
    cfg = {"merge_method": "ties", "base_model": str(ck / "base"),
           "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}}
                      for m in models], "dtype": "bfloat16"}
    path = work / "ties.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    size_in = sum(f.stat().st_size for d in [ck / "base", *models]
                  for f in d.glob("*.safetensors"))
    return path, size_in


def bench_backend(cfg: Path, work: Path, backend: str, device: str) -> dict:
    """One backend: the sweep, then the K merges of its points' configs, compared."""
    on = ["--backend", backend, "--device", device, "--quiet"]
    out = work / f"sweep-{backend}"
    row = {"backend": backend, "device": device, "grid": GRID}
    secs, err = _run(_command("sweep", cfg, out, "--grid", GRID, *on))
    row["sweep_seconds"] = round(secs, 3)
    if err:
        row["error"] = f"sweep: {err}"
        return row
    points = sorted(p for p in out.iterdir() if p.is_dir())
    row["k"] = len(points)
    total, same = 0.0, True
    for p in points:
        one = work / f"merge-{backend}-{p.name}"
        pc = work / f"{p.name}.yml"
        pc.write_text((p / "fastmerge_config.yml").read_text())
        secs, err = _run(_command("merge", pc, one, *on))
        total += secs
        if err:
            row["error"] = f"merge {p.name}: {err}"
            return row
        same = same and _same(p, one)
        shutil.rmtree(one, ignore_errors=True)
    row["merges_seconds"] = round(total, 3)
    row["byte_identical"] = same
    row["speedup"] = round(total / row["sweep_seconds"], 2)
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(res: dict) -> list:
    lines = ["", f"## Sweep: K = 3 TIES points ({GRID}), {res.get('size')} checkpoints "
             f"({res.get('input_gb', 0):.2f} GB in) in host memory", ""]
    if res.get("error"):
        return lines + [f"not run: {res['error']}"]
    lines += ["| backend | sweep s | 3 merges s | merges / sweep | points == merge |",
              "|---|---:|---:|---:|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r.get('sweep_seconds', '-')} | - | - | "
                         f"ERROR: {r['error']} |")
        else:
            lines.append(f"| {r['backend']} | {r['sweep_seconds']:.2f} | "
                         f"{r['merges_seconds']:.2f} | {r['speedup']:.2f}x | "
                         f"{'yes' if r['byte_identical'] else 'NO'} |")
    return lines + ["", "Each time is the whole command (process start, torch import, CUDA "
                        "start-up included)."]


def write(outdir: Path, res: dict) -> None:
    """sweep.json and sweep.md, each replaced atomically (after every backend)."""
    for name, text in (("sweep.json", json.dumps(res, indent=2)),
                       ("sweep.md", "\n".join(table(res)) + "\n")):
        tmp = outdir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, outdir / name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--size", default="0.2b", help="make_checkpoints.py size (default 0.2b)")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    res = {"size": args.size, "rows": []}
    sys.path.insert(0, str(ROOT))
    from fastmerge.backends import availability
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="fm-kit-sweep-", dir=shm) as tmp:
        try:
            cfg, size_in = make_inputs(Path(tmp), args.size)
        except RuntimeError as exc:
            res["error"] = str(exc)
            write(outdir, res)
            return 1
        res["input_gb"] = size_in / GB
        for b in args.backends.split(","):
            ok, why = availability(b)
            res["rows"].append(bench_backend(cfg, Path(tmp), b, args.device) if ok else
                               {"backend": b, "error": f"unavailable: {why}"})
            write(outdir, res)
    print("\n".join(table(res)))
    return 0 if all("error" not in r for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
