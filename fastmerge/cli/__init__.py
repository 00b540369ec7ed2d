"""Command line: ``fastmerge merge CONFIG.yml OUT_DIR``, ``fastmerge demo``,
``fastmerge backends`` (also ``python -m fastmerge ...``)."""
from __future__ import annotations

import argparse
import os
import re
import sys

DEBUG_ENV = "FASTMERGE_DEBUG"
USAGE, FAILURE, INTERRUPTED = 2, 1, 130   # exit statuses (argparse also exits 2 on bad usage)


class UsageError(Exception):
    """A bad command line (the parser's complaint), exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its complaint as fastmerge's one error line instead of usage + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _size_arg(what: str):
    def parse(text):
        from ..output.writer import parse_size
        try:
            return parse_size(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _seed_arg(text) -> int:
    try:
        seed = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    if not 0 <= seed < 2 ** 64:
        raise argparse.ArgumentTypeError(f"seed {text!r} must be in [0, 2^64)")
    return seed


def _device_arg(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"device {text!r}: use cpu, cuda or cuda:N")
    return text


def build_parser() -> argparse.ArgumentParser:
    from ..backends import BACKEND_NAMES  # the registry (torch-free)
    p = _Parser(prog="fastmerge", description="Fused, memory-frugal model merging")
    p.add_argument("--debug", action="store_true",
                   help=f"show the full traceback of an error (also {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML config",
                       description="Merge whole checkpoints as a mergekit-style YAML config "
                       "says, streaming tensors under a memory budget into sharded safetensors.")
    m.add_argument("config", help="merge config (YAML; mergekit syntax + scope, lines)")
    m.add_argument("out_dir", help="output directory (written atomically)")
    m.add_argument("--device", default="cpu", type=_device_arg,
                   help="cpu or cuda (default: cpu)")
    m.add_argument("--memory-budget", default=None, type=_size_arg("memory budget"),
                   help="bound on what the merge allocates, e.g. 8GiB (default: min(8GiB, "
                        "half the RAM))")
    m.add_argument("--shard-size", default="5GB", type=_size_arg("shard size"),
                   help="output shard size (default: 5GB)")
    m.add_argument("--backend", default="auto",
                   choices=list(BACKEND_NAMES),
                   help="kernel backend (default: auto)")
    m.add_argument("--seed", type=_seed_arg, default=None,
                   help="DARE seed (overrides the config)")
    m.add_argument("--lines-pattern", default=None,
                   help="regex whose last group is the block index (LiNeS depth, gradients)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    m.add_argument("--allow-nonfinite", action="store_true",
                   help="write merged tensors that overflowed to NaN/Inf (with a warning "
                        "naming them) instead of stopping with an error")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--dry-run", action="store_true",
                   help="resolve and check everything (configs, indexes, headers) and print "
                        "the plan, without reading a weight or writing anything")
    d = sub.add_parser("demo", help="merge tiny synthetic models, in memory and as checkpoints "
                                    "through the engine (no network)")
    d.add_argument("--backend", action="append", help="backend(s) to time (default: all here)")
    b = sub.add_parser("backends", help="list the backends, the devices each runs on and "
                                        "whether it can run here (or why not)")
    from .sweep import add_parser as add_sweep
    sw = add_sweep(sub, _size_arg, _seed_arg, _device_arg, BACKEND_NAMES)
    ls = sub.add_parser("methods", help="list every merge method with its parameters, defaults "
                                        "and domains")
    for s in (m, d, b, sw, ls):   # --debug after the command too (SUPPRESS: the global value)
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    sub.add_parser("extract-second-moments", add_help=False,
                   help="write an optimizer checkpoint's exp_avg_sq as safetensors named like "
                        "the weights (for ffg/ota preconditioner_path)")
    sub.add_parser("extract-lora", add_help=False,
                   help="a peft LoRA adapter of a fine-tune over its base (truncated SVD per "
                        "tensor; see 'fastmerge extract-lora --help')")
    sub.add_parser("mergekit-yaml", add_help=False,
                   help="mergekit's own mergekit-yaml, with fastmerge doing the tensor math "
                        "(same arguments; FASTMERGE_MERGEKIT=0 runs stock mergekit)")
    return p


def _merge(args) -> int:
    # without torch where the method allows (pipeline/native.py), else on a torch backend
    from ..pipeline.native import dry_run, merge
    if args.dry_run:    # the plan, without reading a weight
        print(dry_run(args.config, args.out_dir, device=args.device,
                      memory_budget=args.memory_budget, shard_size=args.shard_size,
                      backend=args.backend, seed=args.seed, overwrite=args.overwrite,
                      lines_pattern=args.lines_pattern))
        return 0
    res = merge(args.config, args.out_dir, device=args.device,
                memory_budget=args.memory_budget, shard_size=args.shard_size,
                backend=args.backend, seed=args.seed, overwrite=args.overwrite,
                quiet=args.quiet, lines_pattern=args.lines_pattern,
                allow_nonfinite=args.allow_nonfinite)
    print(res.summary())
    return 0


def _dispatch(argv: list) -> int:
    if argv and argv[0] == "extract-second-moments":
        from .second_moments import main as extract
        return extract(argv[1:])
    if argv and argv[0] == "extract-lora":
        from .extract_lora import main as extract_lora
        return extract_lora(argv[1:])
    if argv and argv[0] == "mergekit-yaml":  # mergekit parses its own options
        from ..integrations.mergekit import main as mergekit_yaml
        return mergekit_yaml(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        return _merge(args)
    if args.command == "sweep":
        from .sweep import run as run_sweep
        return run_sweep(args)
    if args.command == "demo":
        from ..backends import available_backends
        from .demo import run_demo, run_engine_demo
        # default: the fastest backend here only (keeps the demo short); --backend X
        # (repeatable) to time and compare several
        here = [b for b in ("cpu", "torch") if available_backends().get(b) == "ok"][:1]
        run_demo(args.backend or here)
        run_engine_demo(backend=(args.backend or here)[0])
        return 0
    if args.command == "methods":
        from .methods_list import describe_methods
        print(describe_methods())
        return 0
    if args.command == "backends":
        from ..backends import REGISTRY, available_backends
        for name, state in available_backends().items():
            print(f"{name:<7} {','.join(REGISTRY[name].devices):<9} {state}")
        return 0
    return USAGE  # pragma: no cover


def _one_line(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    return re.sub(r"\s*\n\s*", " ", msg).strip()


def _exit_status(exc: BaseException, command: str):
    """(exit status, message) for an exception that ended a command: 2 for a bad command
    line or config value, 1 for a failure (input files, I/O, NaN/Inf outputs, memory), and
    1 with "internal error" for anything else (a bug)."""
    from ..recipe.config import ConfigError
    if isinstance(exc, (UsageError, ConfigError)):
        return USAGE, _one_line(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return FAILURE, f"out of memory ({_one_line(exc)}); lower --memory-budget"
    if isinstance(exc, (ValueError, OSError)):   # CheckpointError, OutputError, NonFiniteOutput
        return FAILURE, _one_line(exc)
    how = f"run again with --debug (or {DEBUG_ENV}=1) for the traceback"
    if command == "mergekit-yaml":   # mergekit's own code raised it
        return FAILURE, f"mergekit-yaml: {type(exc).__name__}: {_one_line(exc)} ({how})"
    return FAILURE, (f"internal error: {type(exc).__name__}: {_one_line(exc)}; this is a "
                     f"fastmerge bug — {how} and report it")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"fastmerge: warning: {_one_line(message) if isinstance(message, Warning) else message}",
          file=file or sys.stderr)


def main(argv=None) -> int:
    """Run one command; every error is one line ``fastmerge: error: ...`` on stderr and an exit
    status (2 usage, 1 failure, 130 interrupted), the traceback only with --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    while argv and argv[0] == "--debug":   # before the commands that parse their own options
        debug, argv = True, argv[1:]
    if argv and argv[0] not in ("extract-second-moments", "mergekit-yaml") and \
            "--debug" in argv[:argv.index("--") if "--" in argv else len(argv)]:
        debug = True
    import warnings
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _dispatch(argv)
    except KeyboardInterrupt as exc:  # writer.Interrupted carries SIGTERM/SIGHUP's 128 + signum
        status = getattr(exc, "exit_status", INTERRUPTED)
        what = "interrupted" if status == INTERRUPTED else f"stopped by {exc.args[0]}"
        print(f"fastmerge: {what}; no output was written", file=sys.stderr)
        return status
    except Exception as exc:  # noqa: BLE001 - the CLI's one place that reports every error
        status, msg = _exit_status(exc, argv[0] if argv else "")
        if debug:
            import traceback
            traceback.print_exc()
        prefix = ""
        if "torch" in sys.modules:   # a torchrun merge names its rank
            from ..pipeline.parallel import rank_prefix
            prefix = rank_prefix()
        print(f"fastmerge: error: {prefix}{msg}", file=sys.stderr)
        return status
    finally:
        warnings.showwarning = shown


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
