"""After a sweep's merges: each point's evaluation (a shell command, its score the last number
it prints or a JSON field), the table (sweep.csv, sweep.json), keep-best and the plot of score
over the grid; torch-free."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)\b")
TABLE_CSV, TABLE_JSON, PLOT = "sweep.csv", "sweep.json", "sweep.png"
WEIGHT_SUFFIXES = (".safetensors",)


def parse_score(text: str, metric: Optional[str] = None) -> float:
    """The score an evaluation printed: the last number, or with ``metric`` the field of
    that name (``a.b`` for nested) in the last JSON object it printed."""
    if metric is None:
        found = NUMBER.findall(text)
        if not found:
            raise ValueError("printed no number")
        return float(found[-1])
    for obj in reversed(_json_objects(text)):
        value = obj
        for part in metric.split("."):
            if not isinstance(value, dict) or part not in value:
                value = None
                break
            value = value[part]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise ValueError(f"printed no JSON object with a numeric field {metric!r}")


def _json_objects(text: str) -> list:
    """The JSON objects in ``text``: the whole output, else each line that is one."""
    try:
        obj = json.loads(text)
        return [obj] if isinstance(obj, dict) else []
    except ValueError:
        pass
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def evaluate(command: str, model: str, metric: Optional[str]) -> tuple:
    """(score or None, status, seconds): a failing command is recorded, not raised."""
    t0 = time.perf_counter()
    cmd = command.replace("{model}", shlex.quote(model))
    try:
        done = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    except OSError as exc:
        return None, f"failed: {exc}", time.perf_counter() - t0
    secs = time.perf_counter() - t0
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return None, f"failed: exit {done.returncode} {tail[0][:200]}".strip(), secs
    try:
        return parse_score(done.stdout, metric), "ok", secs
    except ValueError as exc:
        return None, f"failed: {exc}", secs


def write_table(directory: Path, rows: list) -> None:
    """sweep.csv and sweep.json, each replaced atomically."""
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    cols = []
    for r in public:
        cols += [k for k in r if k not in cols]
    tmp = Path(directory) / (TABLE_CSV + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in public:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    os.replace(tmp, Path(directory) / TABLE_CSV)
    tmp = Path(directory) / (TABLE_JSON + ".tmp")
    tmp.write_text(json.dumps(public, indent=2, default=str) + "\n")
    os.replace(tmp, Path(directory) / TABLE_JSON)


def keep_best(rows: list, n: int) -> None:
    """Delete the weight files of every point but the ``n`` best scored (higher is better);
    each keeps its row, config and model card."""
    scored = [r for r in rows if isinstance(r.get("score"), float) and not math.isnan(r["score"])]
    best = {r["point"] for r in sorted(scored, key=lambda r: -r["score"])[:n]}
    for r in rows:
        if r["point"] in best:
            continue
        d = Path(r["path"])
        for f in sorted(d.iterdir()):
            if f.name.endswith(WEIGHT_SUFFIXES) or f.name == "model.safetensors.index.json":
                f.unlink()
        r["weights"] = "deleted"


def plot(directory: Path, rows: list, keys: list) -> Optional[str]:
    """sweep.png: score over the grid (the first key on x, one line per value of the others),
    or why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    scored = [r for r in rows if isinstance(r.get("score"), float)]
    if not scored:
        return "no point has a score: no plot"
    x_key, others = keys[0], keys[1:]
    lines: dict = {}
    for r in scored:
        label = ", ".join(f"{k}={r[k]}" for k in others) or "score"
        lines.setdefault(label, []).append((r[x_key], r["score"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in lines.items():
        xs = [p[0] for p in pts]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        pts = sorted(pts, key=lambda p: p[0]) if numeric else pts
        ax.plot([p[0] if numeric else str(p[0]) for p in pts], [p[1] for p in pts],
                marker="o", label=label)
    ax.set_xlabel(x_key)
    ax.set_ylabel("score")
    if others:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(directory) / PLOT, dpi=100)
    plt.close(fig)
    return None


def finish(directory: Path, rows: list, command: Optional[str], metric: Optional[str],
           best: Optional[int], quiet: bool) -> list:
    """Evaluate each point in turn (the table rewritten after each), keep the best, plot."""
    if not command:
        return rows
    keys = [k for k in rows[0] if k not in ("point", "path", "pass", "merge_seconds",
                                            "pass_seconds", "bytes_out", "score",
                                            "eval_status", "eval_seconds", "weights")]
    for r in rows:
        score, status, secs = evaluate(command, r["path"], metric)
        r.update(score=score, eval_status=status, eval_seconds=round(secs, 3))
        if not quiet:
            print(f"fastmerge: sweep: {r['point']}: "
                  f"{score if status == 'ok' else status}", file=sys.stderr)
        write_table(directory, rows)
    if best is not None:
        keep_best(rows, best)
        write_table(directory, rows)
    why = plot(directory, rows, keys)
    if why and not quiet:
        print(f"fastmerge: sweep: {why}", file=sys.stderr)
    return rows
