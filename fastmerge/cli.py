"""Command line: ``fastmerge merge CONFIG.yml OUT_DIR``, ``fastmerge demo``,
``fastmerge backends`` (also ``python -m fastmerge ...``)."""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastmerge", description="Fused, memory-frugal model merging")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML config",
                       description="Merge whole checkpoints as a mergekit-style YAML config "
                       "says, streaming tensors under a memory budget into sharded safetensors.")
    m.add_argument("config", help="merge config (YAML; mergekit syntax + scope, lines)")
    m.add_argument("out_dir", help="output directory (written atomically)")
    m.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    m.add_argument("--memory-budget", default=None,
                   help="bound on what the merge allocates, e.g. 8GiB (default: min(8GiB, "
                        "half the RAM))")
    m.add_argument("--shard-size", default="5GB", help="output shard size (default: 5GB)")
    m.add_argument("--backend", default="auto",
                   choices=["auto", "torch", "cpu", "cuda", "triton"],
                   help="kernel backend (default: auto)")
    m.add_argument("--seed", type=int, default=None, help="DARE seed (overrides the config)")
    m.add_argument("--lines-pattern", default=None,
                   help="regex whose last group is the block index (LiNeS depth, gradients)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    d = sub.add_parser("demo", help="merge tiny synthetic models, in memory and as checkpoints "
                                    "through the engine (no network)")
    d.add_argument("--backend", action="append", help="backend(s) to time (default: all here)")
    sub.add_parser("backends", help="list the backends and whether each can run here")
    sub.add_parser("extract-second-moments", add_help=False,
                   help="write an optimizer checkpoint's exp_avg_sq as safetensors named like "
                        "the weights (for ffg/ota preconditioner_path)")
    sub.add_parser("mergekit-yaml", add_help=False,
                   help="mergekit's own mergekit-yaml, with fastmerge doing the tensor math "
                        "(same arguments; FASTMERGE_MERGEKIT=0 runs stock mergekit)")
    return p


def _merge(args) -> int:
    # without torch where the method allows (engine/native.py), else the engine
    from .engine import CheckpointError, ConfigError, OutputError
    from .engine.native import merge
    try:
        res = merge(args.config, args.out_dir, device=args.device,
                    memory_budget=args.memory_budget, shard_size=args.shard_size,
                    backend=args.backend, seed=args.seed, overwrite=args.overwrite,
                    quiet=args.quiet, lines_pattern=args.lines_pattern)
    except KeyboardInterrupt:
        print("fastmerge: interrupted; no output was written", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, OutputError, FileExistsError, ValueError,
            OSError) as exc:
        prefix = ""
        if "torch" in sys.modules:   # a torchrun merge names its rank
            from .engine.parallel import rank_prefix
            prefix = rank_prefix()
        print(f"fastmerge: error: {prefix}{exc}", file=sys.stderr)
        return 1
    print(res.summary())
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "extract-second-moments":
        from .second_moments import main as extract
        return extract(argv[1:])
    if argv and argv[0] == "mergekit-yaml":  # mergekit parses its own options
        from .integrations.mergekit import main as mergekit_yaml
        return mergekit_yaml(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        return _merge(args)
    if args.command == "demo":
        from .backends import available_backends
        from .demo import run_demo, run_engine_demo
        # default: the fastest backend here only (keeps the demo short); --backend X
        # (repeatable) to time and compare several
        here = [b for b in ("cpu", "torch") if available_backends().get(b) == "ok"][:1]
        run_demo(args.backend or here)
        run_engine_demo(backend=(args.backend or here)[0])
        return 0
    if args.command == "backends":
        from .backends import available_backends
        for name, state in available_backends().items():
            print(f"{name:<7} {state}")
        return 0
    return 2  # pragma: no cover


def run() -> None:
    """The process entry point (``fastmerge``, ``python -m fastmerge``). After ``merge``, it
    exits without the interpreter's teardown: unloading torch took 0.4-0.5 s per command here
    (a fifth of a whole 0.2B task_arithmetic merge), and by then the output is complete,
    fsynced and renamed into place, and every file and thread pool of the merge is closed."""
    argv = sys.argv[1:]
    rc = main(argv)
    if argv and argv[0] == "merge":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    run()
