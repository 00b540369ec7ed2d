"""Shared by the end-to-end tests against mergekit 0.1.5 (tests/test_mergekit_methods_run.py,
tests/test_slices_methods.py): tiny float32 Llama checkpoints, mergekit's own merge of a
config, and the float32 closeness the outputs are held to."""
from __future__ import annotations

import pytest
import torch
from engine_util import load_dir

RTOL = 2.0 ** -16       # float32 outputs: far below one bf16 ulp (2^-8)


def write_tiny_llamas(root, names, noise: float, **config) -> dict:
    """One float32 Llama checkpoint per name under root (name -> path): the first is a fresh
    model (torch seed 0), each other one it plus ``noise`` * N(0, 1) (generator seed 1);
    ``config`` are LlamaConfig's fields."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**config)
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    paths = {}
    for name in names:
        sd = {k: v if name == names[0] else v + noise * torch.randn(v.shape, generator=g)
              for k, v in base.items()}
        model = transformers.LlamaForCausalLM(cfg)
        model.load_state_dict(sd)
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def run_mergekit(cfg, out, seed=None) -> dict:
    """mergekit 0.1.5's run_merge of the raw config into out (what ``mergekit-yaml`` runs);
    its output tensors. ``seed``: mergekit's random_seed (None: it seeds nothing)."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    opts = MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed,
                        write_model_card=False)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options=opts)
    return load_dir(out)


def assert_close(got, want, rtol=RTOL):
    """The same tensor names, each within rtol of the largest magnitude of mergekit's."""
    assert set(got) == set(want), set(got) ^ set(want)
    for k in want:
        scale = float(want[k].abs().max()) or 1.0
        err = float((got[k].float() - want[k].float()).abs().max())
        assert err <= rtol * scale, (k, err, scale)
