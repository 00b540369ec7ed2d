"""Compile the Triton kernels for a CUDA target without a GPU (TTIR -> TTGIR -> LLVM -> PTX ->
cubin with the ptxas that ships with triton).

The interpreter that runs the kernels in CI is more lenient than the compiler (types of
values merged across branches, constexpr folding, tuple indexing, libdevice calls), so this
checks that every specialisation the backend launches also compiles for a real GPU.

It compiles with the launch options of fastmerge/backends/triton/_registry.py (no FMA
contraction) unless --fp-fusion; each line reports ptxas's registers and spills, and --ptx DIR
writes every variant's PTX there (tests/test_triton_backend.py greps it for ``fma.rn.f32`` and
``div.full.f32``, which the interpreter, the CPU and the CUDA kernels never execute).

Run it in a process where TRITON_INTERPRET is unset (the kernels must be JIT functions):
    TRITON_INTERPRET=0 python -m fastmerge.backends.triton.compile_check [--arch 90] [--all]
        [--fp-fusion] [--ptx DIR]
Exit status 0 when everything compiled; one line per kernel variant.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time


def _variants(full: bool, many_models: bool = False):
    """(kernel name, argument types, constexprs) of the specialisations to compile;
    many_models: also the TIES merge at N = 8, 16 and 32 (register pressure)."""
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
    for n in (8, 16, 32) if many_models else ():
        out.append(("_fused_merge_kernel", {**merge_types, **slots(["*bf16"])},
                    dict(N=n, HAS_BASE=True, HAS_V=False, COMBINE=2, SCORE=0, ELECT=0,
                         ELECT_ON=0, NORMALIZE=1, INTERP=False,
                         BLOCK=_merge_block(n))))
    out.append(("_fused_merge_kernel", {**merge_types, **slots(["*fp32"]), "out": "*fp16"},
                dict(N=1, HAS_BASE=False, HAS_V=True, COMBINE=5, SCORE=1, ELECT=0, ELECT_ON=0,
                     NORMALIZE=0, INTERP=False, BLOCK=1024)))
    hist_types = dict(base="*bf16", targets="*i64", counts="*i64", sums="*fp64", limbs="*i64",
                      n="i64")
    for level, score, agg in [(0, 0, True), (0, 1, False), (0, 0, False), (1, 0, False),
                              (1, 1, False)]:
        out.append(("_score_histogram_kernel", {**hist_types, **slots(mixed)},
                    dict(N=3, HAS_BASE=True, HAS_V=score == 1, SCORE=score, LEVEL=level,
                         AGGREGATE=agg, LIMBS=score == 1, BLOCK=2048)))
    stats_types = dict(base="*bf16", fp="*fp32", ip="*i64", partial="*fp64", n="i64",
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


# The body launch of a call split by _peel.py: every pointer 16-byte aligned and the size a
# multiple of 16, which Triton's launcher specialises (tt.divisibility = 16) and then
# vectorises; written as <variant>-DIV16.ptx (the test greps it for ld.global.v2 / .v4).
DIV16 = "-DIV16"


def _body_variants():
    """The TIES merge (mixed dtypes) and the plain level-0 histogram as body launches."""
    return [v for v in _variants(False)
            if (v[0] == "_fused_merge_kernel" and v[2]["COMBINE"] == 2 and v[2]["N"] == 3)
            or (v[0] == "_score_histogram_kernel" and v[2]["LEVEL"] == 0
                and not v[2]["AGGREGATE"] and not v[2]["LIMBS"])]


def _divisible(fn, types: dict, consts: dict) -> dict:
    """ASTSource attrs of a body launch: pointers and the element count divide by 16."""
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
            if a not in consts and (types[a].startswith("*") or a == "n")}


def _merge_block(n: int) -> int:
    """The block the registry launches the merge with at N models on a GPU (8 warps)."""
    from ._registry import _launch_config
    return _launch_config(n)[0]


def _maxnreg(n: int) -> dict:
    """The register cap the registry launches the merge with at N models."""
    from ._registry import _merge_options
    return _merge_options(n)


def uses_pow(consts: dict) -> bool:
    """Whether a variant calls libdevice powf (whose own code uses FMAs, within its ulp bound):
    OTA's merge and the statistics with second moments."""
    return consts.get("COMBINE") == 5 or ("COMBINE" not in consts and consts.get("HAS_V", False)
                                         and "LEVEL" not in consts)


def variant_name(name: str, consts: dict) -> str:
    keys = ("N", "COMBINE", "SCORE", "ELECT", "ELECT_ON", "NORMALIZE", "LEVEL", "AGGREGATE",
            "HAS_V")
    return name + "".join(f"-{k}{int(consts[k])}" for k in keys if k in consts)


def ptxas_report(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill bytes) that triton's ptxas reports for one kernel's PTX (a compiled
    kernel knows them only once loaded on a GPU)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)  # sm_90a for Hopper
        res = subprocess.run([get_ptxas(arch).path, f"-arch={target.group(1)}", "-v", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None)


def compile_all(arch: int = 90, full: bool = False, num_warps: int = 8, verbose=print,
                fp_fusion: bool = False, ptx_dir: str | None = None, regs: bool = False,
                many_models: bool = False) -> int:
    """Compile every variant for sm_<arch>; returns how many compiled (raises on failure).
    ptx_dir: write each variant's PTX there as <variant_name>.ptx."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _kernels as K
    if not isinstance(K._fused_merge_kernel, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were loaded in interpreter mode; run with "
                           "TRITON_INTERPRET unset")
    target = GPUTarget("cuda", arch, 32)
    done = 0
    jobs = [(v, False) for v in _variants(full, many_models)]
    jobs += [(v, True) for v in _body_variants()]
    for (name, types, consts), body in jobs:
        fn = getattr(K, name)
        sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
        t0 = time.time()
        opts = {"num_warps": num_warps, "enable_fp_fusion": fp_fusion}
        if name == "_fused_merge_kernel":
            opts.update(_maxnreg(consts["N"]))
        attrs = _divisible(fn, types, consts) if body else None
        compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                                  options=opts)
        assert compiled.asm.get("cubin"), name
        done += 1
        if ptx_dir:
            stem = variant_name(name, consts) + (DIV16 if body else "")
            with open(os.path.join(ptx_dir, stem + ".ptx"), "w") as f:
                f.write(compiled.asm["ptx"])
        if verbose:
            short = {k: v for k, v in consts.items() if k not in ("INTERP", "BLOCK")}
            short = {**short, "body": True} if body else short
            usage = ""
            if regs:
                n_regs, spills = ptxas_report(compiled.asm["ptx"], arch)
                usage = f" regs={n_regs} spills={spills}B"
            verbose(f"ok {name} {short}{usage} {time.time() - t0:.1f}s")
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all", action="store_true", help="every election/normalize variant")
    ap.add_argument("--fp-fusion", action="store_true",
                    help="compile with FMA contraction on (triton's default; the launches "
                         "turn it off)")
    ap.add_argument("--ptx", metavar="DIR", help="write each variant's PTX into DIR")
    ap.add_argument("--regs", action="store_true",
                    help="print ptxas's registers and spills of every variant")
    ap.add_argument("--many-models", action="store_true",
                    help="also compile the TIES merge for N = 8, 16, 32")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile the kernels", file=sys.stderr)
        return 2
    if args.ptx:
        os.makedirs(args.ptx, exist_ok=True)
    n = compile_all(args.arch, args.all, fp_fusion=args.fp_fusion, ptx_dir=args.ptx,
                    regs=args.regs, many_models=args.many_models)
    print(f"{n} kernel variants compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
