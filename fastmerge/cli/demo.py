"""``fastmerge demo``: a network-free tour. Makes a tiny synthetic base model and three
fine-tunes in memory, merges them with several methods and prints what it did and how long
it took on each backend available here; then writes small synthetic checkpoints to a
temporary directory and merges them end to end from a YAML config with the checkpoint
engine (``fastmerge merge``)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..api import merge_tensors
from ..backends import available_backends
from ..methods.lines import block_index, count_blocks, lines_factor

DEMO_METHODS = [
    ("task_arithmetic", dict(weights=[0.5, 0.3, 0.2])),
    ("ties", dict(density=0.3, weights=[0.5, 0.3, 0.2])),
    ("dare_ties", dict(density=0.5, seed=42)),
    ("breadcrumbs_ties", dict(density=0.4, gamma=0.02)),
    ("consensus_ties", dict(density=0.3, consensus_k=2)),
]


def synthetic_model(layers: int = 4, hidden: int = 256, inter: int = 688, vocab: int = 1000,
                    n_finetunes: int = 3, seed: int = 0):
    """A Llama-shaped base state dict (bf16) and fine-tunes = base + small noise."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter),
                       p + "input_layernorm.weight": (hidden,)})
    shapes["lm_head.weight"] = (vocab, hidden)
    base = {k: (0.02 * torch.randn(s, generator=g)).to(torch.bfloat16) for k, s in shapes.items()}
    tunes = [{k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
              for k, v in base.items()} for _ in range(n_finetunes)]
    return base, tunes


def run_demo(backends=None, print_fn=print) -> dict:
    base, tunes = synthetic_model()
    n_params = sum(v.numel() for v in base.values())
    avail = available_backends()
    print_fn(f"fastmerge demo: synthetic Llama-like base ({n_params / 1e6:.1f}M params, bf16) "
             f"+ {len(tunes)} fine-tunes, merged tensor by tensor in memory")
    print_fn("backends here: " + ", ".join(f"{k}={'ok' if v == 'ok' else 'unavailable'}"
                                           for k, v in avail.items()))
    backends = backends or [b for b in ("cpu", "torch") if avail.get(b) == "ok"]
    depth_blocks = count_blocks(base)
    results = {}
    for method, params in DEMO_METHODS:
        for be in backends:
            t0 = time.perf_counter()
            merged = {}
            for name, b in base.items():
                lf = lines_factor(block_index(name), depth_blocks, 1.0, 0.0)
                merged[name] = merge_tensors(b, [t[name] for t in tunes], method,
                                             tensor_name=name, backend=be, lines_factor=lf,
                                             **params)
            dt = time.perf_counter() - t0
            moved = n_params * 2 * (len(tunes) + 2)
            delta = sum((merged[k].float() - base[k].float()).abs().sum().item() for k in base)
            print_fn(f"  {method:<17} backend={be:<6} {dt * 1e3:8.1f} ms  "
                     f"{moved / dt / 1e9:6.2f} GB/s  mean |merged - base| = "
                     f"{delta / n_params:.2e}")
            results[(method, be)] = merged
    return results


# ----------------------------------------------------------------------------- checkpoints
def llama_shapes(layers: int, hidden: int, inter: int, vocab: int, kv: Optional[int] = None,
                 only: Optional[Sequence[str]] = None):
    """Tensor names and shapes of a Llama-like model, in checkpoint order (``only``: keep
    just the per-layer tensors whose names contain one of these strings)."""
    kv = kv or hidden
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "post_attention_layernorm.weight": (hidden,),
                       p + "mlp.gate_proj.weight": (inter, hidden),
                       p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter)})
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    if only is not None:
        shapes = {k: v for k, v in shapes.items()
                  if ".layers." not in k or any(o in k for o in only)}
    return shapes


def save_checkpoint(directory, tensors: dict, shards: int = 1, config: Optional[dict] = None,
                    tokenizer: bool = True) -> Path:
    """Write ``tensors`` as a HF-style safetensors checkpoint in ``shards`` files + index."""
    from safetensors.torch import save_file
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    wmap = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        if not part:
            continue
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else \
            "model.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(d / fn),
                  metadata={"format": "pt"})
        wmap.update({k: fn for k in part})
    if shards > 1:
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                            for t in tensors.values())},
             "weight_map": wmap}))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
        (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}))
    return d


def make_synthetic_checkpoints(root, n_models: int = 3, layers: int = 4, hidden: int = 128,
                               inter: int = 344, vocab: int = 512, shards: int = 2,
                               dtype=torch.bfloat16, seed: int = 0, scale: float = 0.002,
                               moments: bool = False, only: Optional[Sequence[str]] = None
                               ) -> dict:
    """A base and ``n_models`` fine-tunes (base + noise) as checkpoint directories under
    ``root``; returns {"base": path, "models": [paths], "moments": [files]}."""
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(layers, hidden, inter, vocab, only=only)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab,
           "num_attention_heads": max(1, hidden // 32), "torch_dtype": str(dtype)[6:]}
    base32 = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    base = save_checkpoint(root / "base", {k: v.to(dtype) for k, v in base32.items()}, shards,
                           cfg)
    models, mfiles = [], []
    shared = {k: scale * torch.randn(v.shape, generator=g) for k, v in base32.items()}
    for i in range(n_models):
        tensors = {k: (v + shared[k] + scale * torch.randn(v.shape, generator=g)).to(dtype)
                   for k, v in base32.items()}
        models.append(save_checkpoint(root / f"model_{i}", tensors, shards, cfg))
        if moments:
            from safetensors.torch import save_file
            f = root / f"moments_{i}.safetensors"
            save_file({k + ".exp_avg_sq": torch.rand(v.shape, generator=g).square() * 1e-3
                       for k, v in base32.items()}, str(f))
            mfiles.append(f)
        del tensors
    return {"base": base, "models": models, "moments": mfiles}


DEMO_YAML = """\
merge_method: ties
base_model: {base}
models:
  - model: {m0}
    parameters: {{weight: 0.5, density: [1.0, 0.5, 0.3]}}   # density gradient over depth
  - model: {m1}
    parameters: {{weight: 0.3, density: 0.4}}
  - model: {m2}
    parameters:
      density: 0.4
      weight:
        - filter: mlp
          value: 0.3
        - value: 0.2
parameters:
  normalize: true
  int8_mask: true
lines: {{alpha: 1.0, beta: 0.5}}
dtype: bfloat16
"""


def run_engine_demo(print_fn=print, backend: str = "auto") -> object:
    """Write synthetic checkpoints to a temp dir, merge them from a YAML config, summarise."""
    from ..pipeline import merge_checkpoints
    with tempfile.TemporaryDirectory(prefix="fastmerge-demo-") as tmp:
        paths = make_synthetic_checkpoints(Path(tmp) / "in", n_models=3, layers=4,
                                           hidden=256, inter=688, vocab=2000, shards=2,
                                           only=("q_proj", "up_proj", "down_proj",
                                                 "input_layernorm"))
        yml = DEMO_YAML.format(base=paths["base"], m0=paths["models"][0],
                               m1=paths["models"][1], m2=paths["models"][2])
        cfg = Path(tmp) / "merge.yml"
        cfg.write_text(yml)
        print_fn(f"fastmerge demo (engine): merging synthetic Llama-like checkpoints from "
                 f"{cfg.name}:")
        for line in yml.splitlines():
            print_fn("    " + line.replace(str(tmp), "$TMP"))
        res = merge_checkpoints(str(cfg), Path(tmp) / "merged", shard_size="2MB",
                                memory_budget="256MiB", backend=backend, quiet=True)
        files = sorted(p.name for p in res.output_dir.iterdir())
        print_fn("  " + res.summary().replace(str(tmp), "$TMP"))
        print_fn(f"  output files: {', '.join(files)}")
        return res
