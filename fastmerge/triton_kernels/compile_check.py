"""Compile the Triton kernels for a CUDA target without a GPU (TTIR -> TTGIR -> LLVM -> PTX ->
cubin with the ptxas that ships with triton).

The interpreter that runs the kernels in CI is more lenient than the compiler (types of
values merged across branches, constexpr folding, tuple indexing, libdevice calls), so this
checks that every specialisation the backend launches also compiles for a real GPU.

Run it in a process where TRITON_INTERPRET is unset (the kernels must be JIT functions):
    TRITON_INTERPRET=0 python -m fastmerge.triton_kernels.compile_check [--arch 90] [--all]
Exit status 0 when everything compiled; one line per kernel variant.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


def _variants(full: bool):
    """(kernel name, argument types, constexprs) of the specialisations to compile."""
    from . import _kernels as K

    def slots(dtypes, vdt="*fp32"):
        d = {}
        for i in range(K.MAX_MODELS):
            d[f"m{i}"] = dtypes[i % len(dtypes)] if i < len(dtypes) else dtypes[0]
            d[f"v{i}"] = vdt
        return d

    mixed = ["*bf16", "*fp16", "*fp32"]
    out = []
    merge_types = dict(base="*bf16", fp="*fp32", ip="*i64", out="*bf16", nonfinite="*i64",
                       n="i64", offset="i64", consensus_k="i32", scale="fp32", power="fp32",
                       eps="fp32")
    flags = [(0, 0, 1), (1, 1, 2), (0, 0, 0)] if full else [(0, 0, 1)]
    for combine, (elect, elect_on, norm) in itertools.product(range(6), flags):
        score = 1 if combine == 5 else 0
        out.append(("_fused_merge_kernel", {**merge_types, **slots(mixed)},
                    dict(N=3, HAS_BASE=combine != 0, HAS_V=combine == 5, COMBINE=combine,
                         SCORE=score, ELECT=elect, ELECT_ON=elect_on, NORMALIZE=norm,
                         INTERP=False, BLOCK=1024)))
    out.append(("_fused_merge_kernel", {**merge_types, **slots(["*fp32"]), "out": "*fp16"},
                dict(N=1, HAS_BASE=False, HAS_V=True, COMBINE=5, SCORE=1, ELECT=0, ELECT_ON=0,
                     NORMALIZE=0, INTERP=False, BLOCK=1024)))
    hist_types = dict(base="*bf16", targets="*i64", counts="*i64", sums="*fp64", n="i64")
    for level, score, agg in [(0, 0, True), (0, 1, True), (0, 0, False), (1, 0, False),
                              (1, 1, False)]:
        out.append(("_score_histogram_kernel", {**hist_types, **slots(mixed)},
                    dict(N=3, HAS_BASE=True, HAS_V=score == 1, SCORE=score, LEVEL=level,
                         AGGREGATE=agg, BLOCK=2048)))
    stats_types = dict(base="*bf16", fp="*fp32", ip="*i64", out="*fp64", n="i64",
                       offset="i64", power="fp32")
    for score in (0, 1):
        out.append(("_model_stats_kernel", {**stats_types, **slots(mixed)},
                    dict(N=3, HAS_BASE=True, HAS_V=True, SCORE=score, INTERP=False,
                         BLOCK=1024)))
    out.append(("_philox_kat_kernel", dict(ctr_ptr="*i64", key_ptr="*i64", out_ptr="*i64"),
                dict(BLOCK=4)))
    out.append(("_philox_stream_kernel", dict(out_ptr="*i64", key="i64", start="i64", n="i64"),
                dict(BLOCK=1024)))
    return out


def compile_all(arch: int = 90, full: bool = False, num_warps: int = 8, verbose=print) -> int:
    """Compile every variant for sm_<arch>; returns how many compiled (raises on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _kernels as K
    if not isinstance(K._fused_merge_kernel, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were loaded in interpreter mode; run with "
                           "TRITON_INTERPRET unset")
    target = GPUTarget("cuda", arch, 32)
    done = 0
    for name, types, consts in _variants(full):
        fn = getattr(K, name)
        sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
        t0 = time.time()
        compiled = triton.compile(ASTSource(fn, sig, consts), target=target,
                                  options={"num_warps": num_warps})
        assert compiled.asm.get("cubin"), name
        done += 1
        if verbose:
            short = {k: v for k, v in consts.items() if k not in ("INTERP", "BLOCK")}
            verbose(f"ok {name} {short} {time.time() - t0:.1f}s")
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all", action="store_true", help="every election/normalize variant")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile the kernels", file=sys.stderr)
        return 2
    n = compile_all(args.arch, args.all)
    print(f"{n} kernel variants compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
