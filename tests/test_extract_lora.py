"""``fastmerge extract-lora`` (docs/semantics.md "Extracting a LoRA"): from a tiny fine-tune
whose deltas are exactly rank r, the adapter reproduces it (error ~0), loads with peft and
round-trips through fastmerge's own ``base+adapter`` input."""
from __future__ import annotations

import json

import pytest
import torch
from ckpt_util import state_dict_of
from engine_util import write_yaml

from fastmerge.cli import main
from fastmerge.cli.extract_lora import low_rank

transformers = pytest.importorskip("transformers")
TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture()
def pair(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "b")
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    for k, v in sd.items():
        if any(f".{t}." in k for t in TARGETS):
            sd[k] = v + 0.1 * torch.randn(v.shape[0], 3) @ torch.randn(3, v.shape[1])
    ft = transformers.LlamaForCausalLM(cfg)
    ft.load_state_dict(sd)
    ft.save_pretrained(tmp_path / "f")
    return tmp_path


def test_exact_rank_delta_is_recovered_and_loads_with_peft(pair, capsys):
    peft = pytest.importorskip("peft")
    d = pair
    assert main(["extract-lora", str(d / "f"), str(d / "b"), str(d / "a"), "--rank", "3",
                 "--target-modules", *TARGETS]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in table and "relative error" in table
    rep = json.loads((d / "a" / "lora_extraction.json").read_text())
    assert len(rep["relative_error"]) == 6 and max(rep["relative_error"].values()) < 1e-5
    cfg = json.loads((d / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3 and sorted(cfg["target_modules"]) == sorted(TARGETS)
    base = transformers.AutoModelForCausalLM.from_pretrained(d / "b")
    model = peft.PeftModel.from_pretrained(base, d / "a")
    ft = transformers.AutoModelForCausalLM.from_pretrained(d / "f")
    x = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ft(x).logits, rtol=1e-4, atol=1e-5)


def test_round_trip_through_a_base_plus_adapter_input(pair):
    d = pair
    assert main(["extract-lora", str(d / "f"), str(d / "b"), str(d / "a"), "--rank", "4",
                 "--quiet"]) == 0
    raw = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": f"{d / 'b'}+{d / 'a'}", "parameters": {"weight": 1.0}}]}
    out = d / "m"
    assert main(["merge", str(write_yaml(d / "c.yml", raw)), str(out), "--quiet"]) == 0
    got, want = state_dict_of(out), state_dict_of(d / "f")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


def test_randomized_svd_on_a_large_matrix():
    torch.manual_seed(1)
    delta = torch.randn(3000, 5) @ torch.randn(5, 2200)
    b, a = low_rank(delta, 5)
    assert b.shape == (3000, 5) and a.shape == (5, 2200)
    assert torch.linalg.norm(delta - b @ a) / torch.linalg.norm(delta) < 1e-4


def test_mistakes_are_one_line_and_write_nothing(pair, capsys):
    d = pair
    assert main(["extract-lora", str(d / "f"), str(d / "b"), str(d / "a"), "--rank", "0"]) == 2
    assert main(["extract-lora", str(d / "f"), str(d / "b"), str(d / "a"), "--rank", "2",
                 "--target-modules", "nope"]) == 2
    assert main(["extract-lora", str(d / "f"), str(d / "b"), str(d / "a"), "--rank", "2",
                 "--memory-budget", "1KiB"]) == 2
    assert main(["extract-lora", str(d / "f"), str(d / "nowhere"), str(d / "a"),
                 "--rank", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(e.startswith("fastmerge: error: ") for e in err), err
    assert "--rank" in err[0] and "nope" in err[1] and "memory budget" in err[2]
    assert not (d / "a").exists()
