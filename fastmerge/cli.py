"""Command line: ``fastmerge demo`` (also ``python -m fastmerge demo``), ``fastmerge backends``."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastmerge", description="Fused, memory-frugal model merging")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="merge a tiny synthetic model with several methods (no network)")
    d.add_argument("--backend", action="append", help="backend(s) to time (default: all here)")
    sub.add_parser("backends", help="list the backends and whether each can run here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        run_demo(args.backend)
        return 0
    if args.command == "backends":
        from .backends import available_backends
        for name, state in available_backends().items():
            print(f"{name:<7} {state}")
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
