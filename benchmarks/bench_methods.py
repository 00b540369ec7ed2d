"""Every method on one tensor with the C++ cpu backend: seconds, passes, useful GB/s.

    python benchmarks/bench_methods.py [--shape 4096x11008] [--n 3] [--reps 3]

Puts the curvature methods (ffg, ota_ffg, which read N more input streams: the second
moments) beside ties and the rest. "useful GB/s" = (base + N models [+ N second moments] +
output) bytes / time, comparable across methods; passes = read passes over the inputs.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402
from bench_cpu import best_time, copy_bandwidth, cpu_model  # noqa: E402
from helpers import make_finetunes  # noqa: E402

import fastmerge as fm  # noqa: E402
from fastmerge.backends import get_backend  # noqa: E402
from fastmerge.methods import resolve_spec  # noqa: E402
from fastmerge.planning.plan import plan_tensor  # noqa: E402
from fastmerge.planning.selection import Chunk  # noqa: E402

PARAMS = {
    "task_arithmetic": {}, "ties": dict(density=0.2), "dare_ties": dict(density=0.5),
    "dare_linear": dict(density=0.5), "breadcrumbs_ties": dict(density=0.2, gamma=0.01),
    "magnitude_prune": dict(density=0.2), "consensus_ties": dict(density=0.2),
    "linear": {}, "ffg": dict(density=0.1), "ota": dict(ota_normalize="global"),
    "ota_ffg": dict(density=0.1),
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x11008")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split("x"))
    base, models, vs = make_finetunes(shape, args.n, ("bf16",), second_moments=True)
    vs = [v.to(torch.bfloat16) for v in vs]
    numel = base.numel()
    bw = copy_bandwidth(reps=3)  # GB/s
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads; measured copy bandwidth "
          f"{bw:.1f} GB/s; tensor {args.shape} bf16, N = {args.n}, backend {args.backend}\n")
    print("| method | passes before merge | seconds | useful GB/s | % of copy BW |")
    print("|---|---|---|---|---|")
    be = get_backend(args.backend, "cpu")
    for method, params in PARAMS.items():
        needs_v = fm.METHODS[method].needs_second_moments
        kw = dict(second_moments=vs) if needs_v else {}
        run = lambda: fm.merge_tensors(base, models, method, backend=args.backend,  # noqa: E731
                                       tensor_name="w", **params, **kw)
        run()
        t = best_time(run, args.reps)
        spec = resolve_spec(method, args.n, **params)
        chunk = Chunk(base, models, vs if needs_v else [], 0, "w")
        passes = plan_tensor(spec, lambda: [chunk], be, numel, "w").passes
        streams = 1 + args.n * (2 if needs_v else 1) + 1
        gbs = streams * 2 * numel / t / 1e9
        print(f"| {method} | {passes} | {t:.3f} | {gbs:.2f} | {100 * gbs / bw:.0f}% |")


if __name__ == "__main__":
    main()
