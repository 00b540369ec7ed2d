"""``fastmerge sweep CONFIG OUT_DIR --grid KEY=V1,V2 ...``: K merges from one read of the
inputs (fastmerge/pipeline/sweep.py), each evaluated by ``--eval-command``."""
from __future__ import annotations


def add_parser(sub, size_arg, seed_arg, device_arg, backends) -> object:
    s = sub.add_parser("sweep", help="merge every point of a parameter grid from one read of "
                                     "the inputs, and evaluate each",
                       description="Merge the cartesian product of --grid values over a config "
                       "into OUT_DIR/<point>/ (each byte-identical to 'fastmerge merge' of its "
                       "parameters), reading the inputs once; table in OUT_DIR/sweep.csv.")
    s.add_argument("config", help="merge config (YAML), the grid's starting point")
    s.add_argument("out_dir", help="new output directory (written atomically)")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of one key: a parameter for every model (density, lambda, "
                        "...), models[i].PARAM, slices[i].PARAM, slices[i].sources[j].PARAM, "
                        "lines.beta, merge_method; repeat for more keys")
    s.add_argument("--eval-command", default=None, metavar="CMD",
                   help="shell command run per point, {model} replaced by its directory; the "
                        "score is the last number it prints")
    s.add_argument("--eval-metric", default=None, metavar="FIELD",
                   help="take the score from this field of the JSON the command prints")
    s.add_argument("--keep-best", type=int, default=None, metavar="N",
                   help="keep the weights of the N best-scored points only")
    s.add_argument("--memory-budget", default=None, type=size_arg("memory budget"),
                   help="bound on what the sweep allocates, all outputs included")
    s.add_argument("--points-per-pass", type=int, default=None, metavar="P",
                   help="merge at most P points per read of the inputs (default: as many as "
                        "the memory budget holds)")
    s.add_argument("--shard-size", default="5GB", type=size_arg("shard size"))
    s.add_argument("--device", default="cpu", type=device_arg)
    s.add_argument("--backend", default="auto", choices=list(backends))
    s.add_argument("--seed", type=seed_arg, default=None, help="DARE seed (overrides the config)")
    s.add_argument("--lines-pattern", default=None)
    s.add_argument("--allow-nonfinite", action="store_true")
    s.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    return s


def run(args) -> int:
    from ..pipeline.launch_env import env_rank
    from ..pipeline.sweep import sweep
    rows = sweep(args.config, args.out_dir, args.grid, eval_command=args.eval_command,
                 eval_metric=args.eval_metric, keep_best=args.keep_best,
                 memory_budget=args.memory_budget, points_per_pass=args.points_per_pass,
                 shard_size=args.shard_size, seed=args.seed, device=args.device,
                 backend=args.backend, quiet=args.quiet, lines_pattern=args.lines_pattern,
                 allow_nonfinite=args.allow_nonfinite)
    if env_rank() != 0:   # under torchrun rank 0 says it once
        return 0
    for r in rows:
        score = "" if r.get("score") is None else f"  score {r['score']:g}"
        print(f"{r['path']}{score}")
    return 0
