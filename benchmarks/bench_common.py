"""What the synthetic-checkpoint benchmarks (bench_engine, bench_distributed) share: the
repository root (on sys.path), the machine line, and their cached synthetic checkpoints."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def machine() -> str:
    from machine_info import describe
    return describe()


def cached_checkpoints(root: Path, dims: tuple, n_models: int, shards: int, marker: str,
                       label: str) -> dict:
    """Synthetic base + ``n_models`` fine-tunes of ``dims`` (layers, hidden, intermediate,
    vocab) under ``root``, made once: the file ``marker`` there says they are complete.
    Prints "``label`` ready in N s"."""
    from fastmerge.cli.demo import make_synthetic_checkpoints
    root.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    layers, hidden, inter, vocab = dims
    done = root / marker
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        make_synthetic_checkpoints(root, n_models=n_models, layers=layers, hidden=hidden,
                                   inter=inter, vocab=vocab, shards=shards)
        done.write_text("ok")
    print(f"{label} ready in {time.perf_counter() - t:.0f} s", flush=True)
    return {"base": root / "base", "models": [root / f"model_{i}" for i in range(n_models)]}
