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

The GPU check kit (benchmarks/gpu_check.sh) uses three more modes, each writing into OUTDIR:
    python benchmarks/gpu.py --env OUTDIR      device and versions -> env.json
    python benchmarks/gpu.py --kit OUTDIR      copy bandwidth; the fused merge pass of ties,
        dare_ties and task_arithmetic on 7B-sized bf16 tensors (4096x11008, 4096x4096, N = 3)
        per backend, GB/s and fraction of the copy bandwidth; a whole streamed merge of
        generated checkpoints held in host memory -> bench.json, bench.md
    python benchmarks/gpu.py --summary OUTDIR  SUMMARY.md from steps.tsv, env.json, the
        suites' JUnit XML files and bench.json (runs anywhere: no GPU needed)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
if HERE not in sys.path:  # bench_cpu, when imported as a module (tests)
    sys.path.insert(0, HERE)

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
    src = dst = None
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
    from fastmerge import abi
    from fastmerge.backends import get_backend
    from fastmerge.methods import resolve_spec
    from fastmerge.planning.plan import plan_tensor
    from fastmerge.planning.selection import Chunk

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
    counts = torch.zeros(n, abi.NUM_BINS, dtype=torch.int64, device=base.device)
    sums = torch.zeros(n, abi.NUM_BINS, dtype=torch.float64, device=base.device)
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
    lines = ["# fastmerge GPU benchmark", "",
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
                except (torch.OutOfMemoryError, ImportError):
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
            base = models = None
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


# ----------------------------------------------------------------------------- GPU check kit
KIT_SHAPES = "4096x11008,4096x4096"
KIT_METHODS = {"ties": dict(density=0.2), "dare_ties": dict(density=0.3, seed=1),
               "task_arithmetic": {}}
KIT_SUITES = ("cuda", "triton", "large")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # not installed, or broken
        return f"not importable ({type(exc).__name__})"


def env_info() -> dict:
    """Device, driver and versions (what SUMMARY.md heads with); no GPU needed."""
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": _version("triton"), "device": "none", "capability": None,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability()
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    info["nvcc"] = _run_line([nvcc, "--version"], last=True) if nvcc else "not found"
    info["driver"] = _run_line(["nvidia-smi", "--query-gpu=driver_version",
                                "--format=csv,noheader"])
    # what fastmerge and the suites import (the GPU machine has no network to add any)
    info["modules"] = {m: _version(m) for m in ("numpy", "safetensors", "yaml", "tqdm",
                                                "pytest")}
    return info


def _run_line(cmd, last: bool = False) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not found"
    lines = out.splitlines()
    return (lines[-1] if last else lines[0]) if lines else "not found"


def merge_pass_bytes(numel: int, n: int, elem: int = 2) -> int:
    """A merge pass reads the base and N models once and writes the output once."""
    return (n + 2) * numel * elem


def kit_merge_pass(backends, shapes, n: int, reps: int, copy_bw: float) -> list[dict]:
    """Time the fused merge pass alone (plan computed once) per shape, method and backend."""
    from fastmerge.backends import get_backend
    from fastmerge.methods import resolve_spec
    from fastmerge.planning.plan import plan_tensor
    from fastmerge.planning.selection import Chunk

    name = "model.layers.0.mlp.up_proj.weight"
    rows = []
    for (r, c) in shapes:
        torch.manual_seed(0)
        base = torch.randn(r, c, device="cuda").to(torch.bfloat16)
        models = [(base.float() + 0.01 * torch.randn(r, c, device="cuda")).to(torch.bfloat16)
                  for _ in range(n)]
        chunk = Chunk(base, models, [], 0, name)
        nbytes = merge_pass_bytes(base.numel(), n)
        for method, params in KIT_METHODS.items():
            spec = resolve_spec(method, n, **params)
            for b in backends:
                row = dict(shape=f"{r}x{c}", n=n, method=method, backend=b)
                try:
                    be = get_backend(b, "cuda")
                    plan = plan_tensor(spec, lambda: [chunk], be, base.numel(), name).on(
                        base.device)
                    t = cuda_time(lambda: be.merge(chunk, plan, torch.bfloat16), reps)
                    row.update(ms=t * 1e3, gbs=nbytes / t / GB, frac=nbytes / t / copy_bw)
                except Exception as exc:  # one failing backend must not end the benchmark
                    row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                rows.append(row)
        base = models = chunk = None  # free the inputs before the next shape
        torch.cuda.empty_cache()
    return rows


def _checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if f.endswith(".safetensors"))


def kit_streamed_merge(backends, size: str, fine_tunes: int, workdir: str) -> list[dict]:
    """Generate checkpoints (benchmarks/make_checkpoints.py) into host memory (/dev/shm where
    there is one) and time `fastmerge merge --device cuda` of a TIES config per backend."""
    import yaml
    maker = os.path.join(HERE, "make_checkpoints.py")
    if not os.path.exists(maker):
        return [dict(method="ties", size=size, error="benchmarks/make_checkpoints.py missing")]
    ck = os.path.join(workdir, "ckpt")
    res = subprocess.run([sys.executable, maker, ck, "--size", size, "--fine-tunes",
                          str(fine_tunes)], capture_output=True, text=True)
    if res.returncode != 0:
        return [dict(method="ties", size=size, error="make_checkpoints failed: "
                     + (res.stderr.strip().splitlines() or ["?"])[-1][:200])]
    models = [os.path.join(ck, f"ft{i}") for i in range(1, fine_tunes + 1)]
    cfg = {"merge_method": "ties", "base_model": os.path.join(ck, "base"),
           "models": [{"model": m, "parameters": {"density": 0.2, "weight": 1.0}}
                      for m in models], "dtype": "bfloat16"}
    cfg_path = os.path.join(workdir, "ties.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    inputs = sum(_checkpoint_bytes(p) for p in [cfg["base_model"]] + models)
    rows = []
    for b in backends:
        out = os.path.join(workdir, f"out-{b}")
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "fastmerge", "merge", cfg_path, out,
                              "--device", "cuda", "--backend", b, "--quiet", "--overwrite"],
                             capture_output=True, text=True, cwd=ROOT)
        secs = time.perf_counter() - t0
        row = dict(method="ties", size=size, n=fine_tunes, backend=b, seconds=secs,
                   input_gb=inputs / GB)
        if run.returncode == 0:
            row["gbs"] = (inputs + _checkpoint_bytes(out)) / secs / GB
        else:
            row["error"] = (run.stderr.strip().splitlines() or ["?"])[-1][:200]
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
    return rows


def run_kit(outdir: str, backends: str, shapes: str, reps: int, size: str) -> dict:
    from fastmerge.backends import availability
    res = {"env": env_info(), "skipped": {}, "merge_pass": [], "streamed": []}
    usable = []
    for b in backends.split(","):
        ok, why = availability(b)
        (usable.append(b) if ok else res["skipped"].__setitem__(b, why))
    if not torch.cuda.is_available():
        res["error"] = "no CUDA device visible to torch"
        return res
    res["copy_gbs"] = copy_bandwidth(reps) / GB
    res["merge_pass"] = kit_merge_pass(usable, parse_shapes(shapes), 3, reps,
                                       res["copy_gbs"] * GB)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="fm-kit-", dir=shm) as work:
        res["streamed"] = kit_streamed_merge(usable, size, 3, work)
    return res


def bench_table(res: dict) -> list[str]:
    """The benchmark's markdown table (also what SUMMARY.md shows)."""
    lines = []
    if res.get("copy_gbs"):
        lines.append(f"Device copy bandwidth (D2D, read + write): {res['copy_gbs']:.0f} GB/s")
    if res.get("error"):
        lines.append(f"Benchmark not run: {res['error']}")
    for b, why in res.get("skipped", {}).items():
        lines.append(f"backend {b} skipped: {why}")
    if res.get("merge_pass"):
        lines += ["", "| fused merge pass | shape | N | backend | ms | GB/s | of copy |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["merge_pass"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['shape']} | {r['n']} | {r['backend']} | "
                             f"{r['error']} |||")
            else:
                lines.append(f"| {r['method']} | {r['shape']} | {r['n']} | {r['backend']} | "
                             f"{r['ms']:.3f} | {r['gbs']:.0f} | {100 * r['frac']:.0f}% |")
    if res.get("streamed"):
        lines += ["", "| streamed merge (host memory -> GPU -> host) | backend | s | GB/s |",
                  "|---|---|---|---|"]
        for r in res["streamed"]:
            what = f"{r['method']} {r['size']} N={r.get('n', '?')}"
            if "error" in r:
                lines.append(f"| {what} | {r.get('backend', '-')} | {r['error']} | |")
            else:
                lines.append(f"| {what} ({r['input_gb']:.1f} GB in) | {r['backend']} | "
                             f"{r['seconds']:.2f} | {r['gbs']:.1f} |")
    return lines


def junit_counts(path: str) -> dict | None:
    """passed / failed / errors / skipped of a pytest JUnit XML file (None: not written)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
    return {"passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
            "failed": tot["failures"], "errors": tot["errors"], "skipped": tot["skipped"]}


def read_steps(outdir: str) -> list[dict]:
    path = os.path.join(outdir, "steps.tsv")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f.read().splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 4:
                rows.append(dict(step=parts[0], rc=int(parts[1]), seconds=int(parts[2]),
                                 limit=int(parts[3])))
    return rows


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def summary_lines(outdir: str) -> list[str]:
    """One screen: device and versions, each step's status, pass/fail per suite, the table."""
    env = _load_json(os.path.join(outdir, "env.json"))
    bench = _load_json(os.path.join(outdir, "bench.json"))
    lines = ["# fastmerge GPU check", ""]
    lines.append(f"- device: {env.get('device', '?')} (sm {env.get('capability') or '?'}, "
                 f"{env.get('memory_gib', '?')} GiB), driver {env.get('driver', '?')}")
    lines.append(f"- torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), triton "
                 f"{env.get('triton', '?')}, python {env.get('python', '?')}; nvcc: "
                 f"{env.get('nvcc', '?')}")
    missing = [m for m, v in env.get("modules", {}).items() if v.startswith("not importable")]
    if missing:
        lines.append(f"- not importable: {', '.join(missing)}")
    lines += ["", "| step | status | time | pass | fail | error | skip |",
              "|---|---|---|---|---|---|---|"]
    for st in read_steps(outdir):
        status = ("ok" if st["rc"] == 0 else "TIMEOUT" if st["rc"] in (124, 137)
                  else f"FAILED ({st['rc']})")
        c = junit_counts(os.path.join(outdir, st["step"] + ".xml")) \
            if st["step"] in KIT_SUITES else None
        counts = (f"{c['passed']} | {c['failed']} | {c['errors']} | {c['skipped']}" if c
                  else "- | - | - | -")
        lines.append(f"| {st['step']} | {status} | {st['seconds']}s / {st['limit']}s | "
                     f"{counts} |")
    lines += [""] + (bench_table(bench) if bench else ["No benchmark results (bench.json)."])
    lines += ["", "Logs: <step>.log in this folder; JUnit XML: cuda.xml, triton.xml, large.xml."]
    return lines


def write_summary(outdir: str) -> str:
    """Write OUTDIR/SUMMARY.md (temporary file, then renamed); returns its path."""
    path = os.path.join(outdir, "SUMMARY.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(summary_lines(outdir)) + "\n")
    os.replace(tmp, path)
    return path


def _write_json(outdir: str, name: str, data: dict) -> None:
    os.makedirs(outdir, exist_ok=True)
    tmp = os.path.join(outdir, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, os.path.join(outdir, name))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None,
                    help=f"default {DEFAULT_SHAPES} ({KIT_SHAPES} with --kit)")
    ap.add_argument("--n", default="2,4,8")
    ap.add_argument("--backends", default=None,
                    help="default cuda,triton,torch (cuda,triton with --kit)")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu.md"))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--env", metavar="OUTDIR", help="write OUTDIR/env.json and exit")
    mode.add_argument("--kit", metavar="OUTDIR", help="the GPU check kit's benchmark")
    mode.add_argument("--summary", metavar="OUTDIR", help="write OUTDIR/SUMMARY.md")
    ap.add_argument("--streamed-size", default="0.2b",
                    help="--kit: checkpoint size of the streamed merge (make_checkpoints.py)")
    args = ap.parse_args(argv)
    if args.shapes is None:
        args.shapes = KIT_SHAPES if args.kit else DEFAULT_SHAPES
    if args.backends is None:
        args.backends = "cuda,triton" if args.kit else "cuda,triton,torch"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.env:
        info = env_info()
        _write_json(args.env, "env.json", info)
        print(json.dumps(info, indent=1))
        return 0
    if args.summary:
        print(open(write_summary(args.summary)).read())
        return 0
    if args.kit:
        res = run_kit(args.kit, args.backends, args.shapes, args.reps, args.streamed_size)
        _write_json(args.kit, "bench.json", res)
        text = "\n".join(bench_table(res)) + "\n"
        with open(os.path.join(args.kit, "bench.md"), "w") as f:
            f.write(text)
        print(text)
        return 1 if res.get("error") else 0
    return run_benchmark(args)


def run_benchmark(args) -> int:
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
