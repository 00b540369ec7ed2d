"""mergekit-yaml with and without fastmerge's integration: wall time and peak RSS.

Builds a synthetic Llama-shaped model (base + 2 fine-tunes, bf16 safetensors, default ~162M
parameters) once, then runs mergekit's own CLI for each method twice, each run in a fresh
process (so peak RSS is that run's own): stock (FASTMERGE_MERGEKIT=0) and patched
(fastmerge.integrations.mergekit.main). Also checks that the two outputs agree (fraction of
elements that differ, and the largest difference) and writes a markdown table.

    python benchmarks/bench_mergekit_integration.py [--workdir /tmp/fm_bench]
        [--methods ties,dare_ties,task_arithmetic] [--out benchmarks/results/integrations.md]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "162M": (768, 3072, 12, 12, 4, 32000),
    "tiny": (64, 128, 2, 4, 2, 128),
}
METHOD_PARAMS = {
    "ties": ([{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 0.5}], None),
    "dare_ties": ([{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 0.5}], None),
    "task_arithmetic": ([{"weight": 0.6}, {"weight": 0.5}], None),
    "breadcrumbs_ties": ([{"weight": 0.6, "density": 0.5, "gamma": 0.01},
                          {"weight": 0.5, "density": 0.5, "gamma": 0.01}], None),
    "linear": ([{"weight": 0.6}, {"weight": 0.5}], None),
}


def make_models(workdir: str, size: str) -> dict:
    """Base + 2 fine-tunes as bf16 safetensors checkpoints (transformers config)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    h, inter, layers, heads, kv, vocab = SIZES[size]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"], dtype="bfloat16")
    head = h // heads
    shapes = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h),
              "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (kv * head, h),
                       p + "self_attn.v_proj.weight": (kv * head, h),
                       p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter),
                       p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    paths = {}
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02)
            for k, s in shapes.items()}
    nparams = sum(v.numel() for v in base.values())
    for name in ("base", "ft0", "ft1"):
        d = os.path.join(workdir, f"{size}_{name}")
        paths[name] = d
        if os.path.exists(os.path.join(d, "model.safetensors")):
            continue
        os.makedirs(d, exist_ok=True)
        sd = {k: (v if name == "base" else v + 0.002 * torch.randn(v.shape, generator=g))
              .to(torch.bfloat16).contiguous() for k, v in base.items()}
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(d)
    paths["nparams"] = nparams
    return paths


def write_config(workdir, paths, method, size):
    import yaml
    params, shared = METHOD_PARAMS[method]
    cfg = {"merge_method": method, "dtype": "bfloat16",
           "models": [{"model": paths[n], "parameters": p} for n, p in zip(("ft0", "ft1"), params)]}
    if method == "linear":
        cfg["models"].insert(0, {"model": paths["base"], "parameters": {"weight": 0.2}})
    else:
        cfg["base_model"] = paths["base"]
    if shared:
        cfg["parameters"] = shared
    path = os.path.join(workdir, f"{size}_{method}.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def one_run(cfg_path: str, out: str, patched: bool) -> dict:
    """Runs in a child process: mergekit's CLI (stock or patched), timed, with peak RSS."""
    os.environ["FASTMERGE_MERGEKIT"] = "1" if patched else "0"
    t0 = time.perf_counter()
    import mergekit.merge  # noqa: F401 - imports are not the merge's cost
    import mergekit.scripts.run_yaml  # noqa: F401

    import fastmerge.integrations.mergekit as fm_mk
    t1 = time.perf_counter()
    rc = fm_mk.main([cfg_path, out, "--no-copy-tokenizer", "--quiet", "--random-seed", "0",
                     "--out-shard-size", "100B"])
    t2 = time.perf_counter()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rec = json.load(open(os.path.join(out, "fastmerge_integration.json")))
    return {"rc": rc, "import_s": t1 - t0, "merge_s": t2 - t1, "peak_rss_mb": rss_kb / 1024,
            "tensors": rec["tensors"], "backend": ",".join(rec["backends_used"]) or "-"}


def compare(a_dir, b_dir) -> dict:
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(a_dir, "model.safetensors")), \
        load_file(os.path.join(b_dir, "model.safetensors"))
    diff = n = 0
    worst = 0.0
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        diff += int((d > 0).sum())
        n += d.numel()
        worst = max(worst, float(d.max()))
    return {"frac_elements_differ": diff / n, "max_abs_diff": worst}


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    from machine_info import describe
    return describe()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/fm_bench_mergekit")
    ap.add_argument("--size", default="162M", choices=sorted(SIZES))
    ap.add_argument("--methods", default="ties,dare_ties,task_arithmetic")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "integrations.md"))
    ap.add_argument("--one", nargs=3, metavar=("CFG", "OUT", "PATCHED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one[0], args.one[1], args.one[2] == "1")))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(args.workdir, exist_ok=True)
    t = time.perf_counter()
    paths = make_models(args.workdir, args.size)
    print(f"models ready ({paths['nparams'] / 1e6:.1f}M params each) in "
          f"{time.perf_counter() - t:.1f}s", flush=True)
    import mergekit  # noqa: F401

    import fastmerge
    from fastmerge.integrations.mergekit import mergekit_version
    rows = []
    for method in args.methods.split(","):
        cfg = write_config(args.workdir, paths, method, args.size)
        res = {}
        for patched in (False, True):
            out = os.path.join(args.workdir, f"out_{args.size}_{method}_{int(patched)}")
            p = subprocess.run([sys.executable, __file__, "--one", cfg, out, str(int(patched))],
                               capture_output=True, text=True, env=dict(os.environ))
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                print(p.stdout[-3000:], p.stderr[-3000:])
                raise SystemExit(f"{method} patched={patched} failed")
            res[patched] = json.loads(line[0][7:]) | {"out": out}
            print(method, "patched" if patched else "stock", res[patched], flush=True)
        cmp = compare(res[False]["out"], res[True]["out"])
        rows.append((method, res[False], res[True], cmp))
    lines = [
        "# mergekit-yaml with and without fastmerge.integrations.mergekit",
        "",
        f"Produced by `benchmarks/bench_mergekit_integration.py --size {args.size}` on "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        f"- Machine: {machine()}; no GPU (mergekit on CPU, `--no-copy-tokenizer`, "
        f"`--random-seed 0`, one shard).",
        f"- Versions: fastmerge {fastmerge.__version__}, mergekit {mergekit_version()}, "
        f"torch {__import__('torch').__version__}; fastmerge backends here: "
        f"{fastmerge.available_backends()}.",
        f"- Model: synthetic Llama-shaped, {paths['nparams'] / 1e6:.1f}M parameters per "
        f"checkpoint, bf16 safetensors; base + 2 fine-tunes (base + 0.002 N(0,1)); "
        f"config `dtype: bfloat16`.",
        "- Each run is a fresh process running mergekit's own CLI "
        "(mergekit.scripts.run_yaml.main) through `fastmerge.integrations.mergekit.main`, "
        "stock with FASTMERGE_MERGEKIT=0. Wall time = the CLI call (graph planning, loading, "
        "merging, writing), imports excluded; peak RSS = the process's ru_maxrss.",
        "",
        "| method | stock wall s | fastmerge wall s | speed-up | stock peak RSS MiB | "
        "fastmerge peak RSS MiB | fastmerge backend | elements differing | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s, f, c in rows:
        lines.append(f"| {method} | {s['merge_s']:.1f} | {f['merge_s']:.1f} | "
                     f"{s['merge_s'] / f['merge_s']:.2f}x | {s['peak_rss_mb']:.0f} | "
                     f"{f['peak_rss_mb']:.0f} | {f['backend']} | "
                     f"{100 * c['frac_elements_differ']:.3f}% | {c['max_abs_diff']:.3g} |")
    lines += [
        "",
        f"Load average (1/5/15 min) at the end: {os.getloadavg()[0]:.1f} / "
        f"{os.getloadavg()[1]:.1f} / {os.getloadavg()[2]:.1f} on {os.cpu_count()} cores "
        "(a shared machine: other jobs ran at the same time, so treat the times as +-20%).",
        "",
        "Outputs differ only where docs/integrations.md says they may. task_arithmetic: "
        "mergekit rounds the bf16 delta, each weighted product and the sum to bf16, fastmerge "
        "rounds once from float32, so about a tenth of the elements differ by one bf16 ulp. "
        "ties: the same, plus elements at the top-k threshold, which are many in bf16 task "
        "vectors this small (fastmerge keeps every tie, mergekit an arbitrary subset). "
        "dare_ties: different random masks by design (mergekit: torch.bernoulli; fastmerge: "
        "counter-based Philox keyed by tensor name), so compare statistics, not elements.",
        "",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
