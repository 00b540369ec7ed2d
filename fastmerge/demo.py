"""``fastmerge demo``: a network-free tour. Makes a tiny synthetic base model and three
fine-tunes in memory, merges them with several methods and prints what it did and how long
it took on each backend available here."""
from __future__ import annotations

import time

import torch

from .api import merge_tensors
from .backends import available_backends
from .lines import block_index, count_blocks, lines_factor

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
