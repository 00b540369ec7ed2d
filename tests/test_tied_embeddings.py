"""Tied embeddings (docs/semantics.md): inputs that tie ``lm_head`` to ``embed_tokens`` and
inputs that do not, merged with tiny transformers Llama models; the output loads with
AutoModelForCausalLM and runs; a missing head is never invented nor dropped; differing
vocabularies are one line naming the tensor and the option."""
from __future__ import annotations

import json

import pytest
import torch
from ckpt_util import state_dict_of, write_config

import fastmerge
from fastmerge.checkpoint.safetensors_file import CheckpointError

transformers = pytest.importorskip("transformers")
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _llama(path, tied, base=None, seed=0, vocab=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=tied)
    m = transformers.LlamaForCausalLM(cfg)
    if base is not None:   # a fine-tune of base: its weights plus noise, its own head if untied
        sd = {k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()}
        if not tied:
            sd[HEAD] = sd[EMBED] + 0.02 * torch.randn_like(sd[EMBED])
        m.load_state_dict(sd, strict=False)
    m.save_pretrained(path)
    assert (HEAD in state_dict_of(path)) is not tied
    return m


def _merge(tmp_path, base, models, name):
    cfg = write_config(tmp_path / f"{name}.yml", base, models)
    out = fastmerge.merge_checkpoints(str(cfg), tmp_path / name, backend="torch").output_dir
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    model(torch.tensor([[1, 2, 3]]))
    return state_dict_of(out), json.loads((out / "config.json").read_text()), model


def test_all_tied_stays_tied(tmp_path):
    b = _llama(tmp_path / "b", True)
    _llama(tmp_path / "f", True, b, 1)
    sd, cfg, model = _merge(tmp_path, tmp_path / "b", [tmp_path / "f"], "out")
    assert HEAD not in sd and cfg["tie_word_embeddings"] is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_all_untied_merges_the_head(tmp_path):
    b = _llama(tmp_path / "b", False)
    _llama(tmp_path / "f", False, b, 1)
    sd, cfg, _ = _merge(tmp_path, tmp_path / "b", [tmp_path / "f"], "out")
    assert HEAD in sd and cfg["tie_word_embeddings"] is False


@pytest.mark.parametrize("base_tied", [True, False])
def test_mixed_tying_merges_a_head_from_each_models_own(tmp_path, base_tied):
    """A tied model's head is its embedding: the output head is merged over every model from
    the head each one has, and the config unties, so the merged head is what loads."""
    b = _llama(tmp_path / "b", base_tied)
    _llama(tmp_path / "f1", not base_tied, b, 1)
    _llama(tmp_path / "f2", True, b, 2)
    sd, cfg, model = _merge(tmp_path, tmp_path / "b", [tmp_path / "f1", tmp_path / "f2"], "o")
    assert HEAD in sd and cfg["tie_word_embeddings"] is False
    ins = [state_dict_of(tmp_path / d) for d in ("b", "f1", "f2")]
    heads = [x.get(HEAD, x[EMBED]) for x in ins]
    want = heads[0] + 0.5 * (heads[1] - heads[0]) + 0.5 * (heads[2] - heads[0])
    torch.testing.assert_close(sd[HEAD], want)
    torch.testing.assert_close(model.lm_head.weight, want)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_a_head_missing_from_an_untied_model_is_an_error(tmp_path):
    b = _llama(tmp_path / "b", False)
    _llama(tmp_path / "f", True, b, 1)
    c = json.loads((tmp_path / "f" / "config.json").read_text())
    (tmp_path / "f" / "config.json").write_text(json.dumps({**c, "tie_word_embeddings": False}))
    cfg = write_config(tmp_path / "c.yml", tmp_path / "b", [tmp_path / "f"])
    with pytest.raises(CheckpointError, match="has no tensor 'lm_head.weight' and its "
                                              "config.json sets tie_word_embeddings: false"):
        fastmerge.merge_checkpoints(str(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_differing_vocabularies_name_the_tensor_and_the_option(tmp_path, capsys):
    b = _llama(tmp_path / "b", True)
    _llama(tmp_path / "f", True, None, 1, vocab=72)
    cfg = write_config(tmp_path / "c.yml", tmp_path / "b", [tmp_path / "f"])
    from fastmerge.cli import main
    capsys.readouterr()
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'model.embed_tokens.weight': shape [72, 32]" in err[0]
    assert "different vocabularies (72 vs 64 tokens)" in err[0] and "tokenizer_source" in err[0]
    assert b is not None and not (tmp_path / "out").exists()
