"""LoRA adapters as inputs (``base+adapter``): the merged weights equal peft's own
merge_and_unload to float32 tolerance on both pipelines (rsLoRA, rank/alpha patterns,
embeddings, modules_to_save, GPT-2's Conv1D), bad adapters are one line, the budget holds."""
from __future__ import annotations

import json

import pytest
import torch
from ckpt_util import (
    assert_rss_within,
    native_rss_inputs,
    state_dict_of,
    write_adapter,
    write_bin,
    write_config,
    write_safetensors,
)

import fastmerge
from fastmerge.checkpoint.safetensors_file import CheckpointError
from fastmerge.checkpoint.sources import open_model
from fastmerge.pipeline import load_config, native

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _peft_case(tmp_path, model, lora_config):
    """(base dir, adapter dir, peft's merged state dict) with non-zero lora_B."""
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, lora_config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding" in n:   # (peft zeroes embedding A)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "modules_to_save" in n:
                p.add_(1.0)
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", pm.merge_and_unload().state_dict()


def _llama(tied=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def _check_against_peft(tmp_path, base, adapter, want):
    cfg = write_config(tmp_path / "c.yml", None, [f"{base}+{adapter}"], "linear",
                       dtype="float32")
    for path in ("engine", "native"):
        out = tmp_path / path
        if path == "engine":
            fastmerge.merge_checkpoints(str(cfg), out, backend="torch")
        else:
            native.merge_natively(load_config(str(cfg)), out)
        got = state_dict_of(out)
        assert set(got) <= set(want)
        for k, v in got.items():
            torch.testing.assert_close(v, want[k].float(), rtol=1e-6, atol=1e-6, msg=k)
    return got


def test_llama_adapter_matches_peft_merge_and_unload(tmp_path):
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3},
                           modules_to_save=["lm_head"])
    base, adapter, want = _peft_case(tmp_path, _llama(), lcfg)
    got = _check_against_peft(tmp_path, base, adapter, want)
    before = state_dict_of(base)
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
              "lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.equal(got[k], before[k].float()), k   # the adapter did change it
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"],
                       before["model.layers.0.mlp.up_proj.weight"].float())


def test_gpt2_conv1d_fan_in_fan_out_matches_peft(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    lcfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_fc"],
                           fan_in_fan_out=True)
    base, adapter, want = _peft_case(tmp_path, model, lcfg)
    _check_against_peft(tmp_path, base, adapter, want)


def test_adapter_in_a_merge_with_bin_base_and_row_chunks(tmp_path):
    """A .bin base under an adapter (.bin too), merged with a fine-tune, in row chunks: the
    same as merging the adapter first (the W + s B A of each chunk's rows)."""
    g = torch.Generator().manual_seed(0)
    sd = {"model.layers.0.mlp.up_proj.weight": torch.randn(48, 32, generator=g),
          "model.norm.weight": torch.randn(32, generator=g)}
    base = write_bin(tmp_path / "base", sd)
    ad = write_adapter(tmp_path / "ad", sd, ["up_proj"], r=4, alpha=16, as_bin=True)
    a = torch.load(ad / "adapter_model.bin", weights_only=True)
    pre = "base_model.model.model.layers.0.mlp.up_proj"
    merged = dict(sd)
    merged["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"] + \
        4.0 * a[f"{pre}.lora_B.weight"] @ a[f"{pre}.lora_A.weight"]
    other = write_safetensors(tmp_path / "other", {k: v + 0.5 for k, v in sd.items()})
    flat = write_safetensors(tmp_path / "flat", merged)
    cfg = write_config(tmp_path / "c.yml", None, [f"{base}+{ad}", other], "linear")
    ref = write_config(tmp_path / "r.yml", None, [flat, other], "linear")
    got = fastmerge.merge_checkpoints(str(cfg), tmp_path / "got", backend="torch",
                                      max_chunk_elems=100)
    want = fastmerge.merge_checkpoints(str(ref), tmp_path / "want", backend="torch")
    g_, w_ = state_dict_of(got.output_dir), state_dict_of(want.output_dir)
    for k in w_:
        torch.testing.assert_close(g_[k], w_[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case, match", [
    ("shape", r"adapter_model.safetensors, tensor .*lora_A.weight': shape \[4, 16\] does not "
              r"fit the base tensor"),
    ("ia3", r"adapter_config.json: peft_type is 'IA3'; only LoRA adapters"),
    ("no_config", r"no adapter_config.json \(not a peft adapter directory\?\)"),
    ("dora", r"DoRA \(use_dora\) is not supported"),
    ("untargeted", r"module .*up_proj' is not in target_modules \['q_proj'\]"),
    ("no_base_tensor", r"the base model .* has no tensor"),
])
def test_bad_adapters_are_one_line_and_nothing_is_written(tmp_path, capsys, case, match):
    g = torch.Generator().manual_seed(0)
    sd = {"model.layers.0.mlp.up_proj.weight": torch.randn(48, 32, generator=g)}
    base = write_safetensors(tmp_path / "base", sd)
    other = write_safetensors(tmp_path / "other", sd)
    ad = write_adapter(tmp_path / "ad", sd, ["up_proj"])
    cfgf = ad / "adapter_config.json"
    if case == "shape":
        ad = write_adapter(tmp_path / "ad2", {"model.layers.0.mlp.up_proj.weight":
                                              torch.zeros(48, 16)}, ["up_proj"])
    elif case == "ia3":
        cfgf.write_text(json.dumps({**json.loads(cfgf.read_text()), "peft_type": "IA3"}))
    elif case == "no_config":
        cfgf.unlink()
    elif case == "dora":
        cfgf.write_text(json.dumps({**json.loads(cfgf.read_text()), "use_dora": True}))
    elif case == "untargeted":
        cfgf.write_text(json.dumps({**json.loads(cfgf.read_text()),
                                    "target_modules": ["q_proj"]}))
    elif case == "no_base_tensor":
        ad = write_adapter(tmp_path / "ad3", {"model.layers.9.mlp.up_proj.weight":
                                              torch.zeros(48, 32)}, ["up_proj"])
    with pytest.raises(CheckpointError, match=match):
        open_model(f"{base}+{ad}")
    cfg = write_config(tmp_path / "c.yml", None, [f"{base}+{ad}", other], "linear")
    from fastmerge.cli import main
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_reference_with_two_plus_signs_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="exactly one '\\+'"):
        open_model(f"{tmp_path}/a+b+c")


@pytest.mark.slow
def test_peak_rss_stays_under_the_budget_with_a_lora_input(tmp_path):
    """W + s B A is formed a block of rows at a time: a LoRA model over inputs several times
    the budget keeps the merge's RSS within it."""
    budget, g, base = native_rss_inputs()
    b = write_safetensors(tmp_path / "base", base)
    ad = write_adapter(tmp_path / "ad", base, ["up_proj"], r=16)
    m1 = write_safetensors(tmp_path / "m1", {k: v + 0.01 for k, v in base.items()})
    cfg = write_config(tmp_path / "c.yml", b, [f"{b}+{ad}", m1])
    small = {"model.layers.0.mlp.up_proj.weight": torch.randn(48, 32, generator=g).bfloat16()}
    sb = write_safetensors(tmp_path / "sb", small)
    sa = write_adapter(tmp_path / "sa", small, ["up_proj"])
    warm = write_config(tmp_path / "w.yml", sb, [f"{sb}+{sa}", sb])
    assert_rss_within(tmp_path, cfg, warm, budget)
