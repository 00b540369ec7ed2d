"""Architectures as people have them: for each, a tiny model built with transformers (random
weights), a base and two fine-tunes (small deterministic deltas; some saved as .bin), merged
with ``fastmerge merge``; the output loads with its AutoModel class, runs, has exactly the
tensors its config implies, and matches mergekit-yaml (float32) where mergekit supports the
architecture. LiNeS finds every block of each (docs/semantics.md, LiNeS)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import yaml
from ckpt_util import state_dict_of, write_safetensors

from fastmerge.checkpoint.embeddings import TIED_PAIRS, tie_flag
from fastmerge.methods.lines import block_position, stack_sizes

transformers = pytest.importorskip("transformers")
V, H = 64, 32           # vocabulary, hidden size: tiny, so the module runs in seconds


def _decoder(cls, tied=False, **kw):
    return cls(vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


@dataclass
class Arch:
    config: Callable            # () -> a transformers config
    model: str                  # the transformers class that builds and saves it
    auto: str                   # the AutoModel class that loads the output
    blocks: dict                # block stack prefix -> number of blocks (LiNeS)
    head: Optional[tuple] = None     # (LM head, the embedding it ties to)
    mergekit: Optional[str] = None   # why mergekit is not compared, where it is not
    bin_model: bool = False     # the second fine-tune saved as pytorch_model.bin
    image: bool = False         # the forward pass takes pixel_values


T = transformers
LAYERS = {"model.layers.": 2}
ARCHS = {
    "gpt2": Arch(lambda: T.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4,
                                      n_positions=32, bos_token_id=1, eos_token_id=2),
                 "GPT2LMHeadModel", "AutoModelForCausalLM", {"transformer.h.": 2},
                 ("lm_head.weight", "transformer.wte.weight"), bin_model=True),
    "llama_tied": Arch(lambda: _decoder(T.LlamaConfig, tied=True), "LlamaForCausalLM",
                       "AutoModelForCausalLM", LAYERS,
                       ("lm_head.weight", "model.embed_tokens.weight")),
    "llama": Arch(lambda: _decoder(T.LlamaConfig), "LlamaForCausalLM", "AutoModelForCausalLM",
                  LAYERS, ("lm_head.weight", "model.embed_tokens.weight"), bin_model=True),
    "qwen2": Arch(lambda: _decoder(T.Qwen2Config, tied=True), "Qwen2ForCausalLM",
                  "AutoModelForCausalLM", LAYERS, ("lm_head.weight", "model.embed_tokens.weight")),
    "gemma": Arch(lambda: _decoder(T.GemmaConfig, tied=True, head_dim=8), "GemmaForCausalLM",
                  "AutoModelForCausalLM", LAYERS, ("lm_head.weight", "model.embed_tokens.weight")),
    "mistral": Arch(lambda: _decoder(T.MistralConfig), "MistralForCausalLM",
                    "AutoModelForCausalLM", LAYERS,
                    ("lm_head.weight", "model.embed_tokens.weight")),
    "mixtral": Arch(lambda: _decoder(T.MixtralConfig, num_local_experts=2,
                                     num_experts_per_tok=1),
                    "MixtralForCausalLM", "AutoModelForCausalLM", LAYERS,
                    ("lm_head.weight", "model.embed_tokens.weight"), bin_model=True),
    "phi3": Arch(lambda: _decoder(T.Phi3Config), "Phi3ForCausalLM", "AutoModelForCausalLM",
                 LAYERS, ("lm_head.weight", "model.embed_tokens.weight")),
    "t5": Arch(lambda: T.T5Config(vocab_size=V, d_model=H, d_ff=48, d_kv=8, num_layers=2,
                                  num_decoder_layers=3, num_heads=4, decoder_start_token_id=0,
                                  feed_forward_proj="gated-gelu"),   # T5 v1.1 / flan-t5
               "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM",
               {"encoder.block.": 2, "decoder.block.": 3}, ("lm_head.weight", "shared.weight"),
               bin_model=True),
    "vit": Arch(lambda: T.ViTConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, image_size=16, patch_size=8),
                "ViTModel", "AutoModel", {"encoder.layer.": 2},
                mergekit="mergekit 0.1.5 has no ViT architecture definition", image=True),
    "clip_vision": Arch(lambda: T.CLIPVisionConfig(hidden_size=H, num_hidden_layers=3,
                                                   num_attention_heads=4, intermediate_size=48,
                                                   image_size=16, patch_size=8),
                        "CLIPVisionModel", "AutoModel", {"encoder.layers.": 3},
                        mergekit="mergekit 0.1.5 has no CLIP architecture definition",
                        image=True),
    "bert": Arch(lambda: T.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=48,
                                      max_position_embeddings=32),
                 "BertForMaskedLM", "AutoModelForMaskedLM", {"bert.encoder.layer.": 2},
                 ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
                 mergekit="mergekit 0.1.5's BertForMaskedLM definition requires bert.pooler.*, "
                          "which transformers' BertForMaskedLM does not have"),
}


def _perturbed(sd: dict, seed: int, scale=0.01) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in sd.items()}


def _build(arch: Arch, root, untied_head=False):
    """(base dir, [fine-tune dirs]): the base and two fine-tunes of it; ``untied_head``: the
    first fine-tune unties its head (its own head, saved), the others keep the base's tying."""
    torch.manual_seed(0)
    cls = getattr(transformers, arch.model)
    base = cls(arch.config()).eval()
    base.save_pretrained(root / "base")
    dirs = []
    for i in (1, 2):
        cfg = arch.config()
        own_head = untied_head and i == 1
        if own_head:
            cfg.tie_word_embeddings = False
        m = cls(cfg)
        sd = _perturbed(base.state_dict(), seed=i)
        if own_head:
            head, embed = arch.head
            sd[head] = _perturbed({"h": sd[embed]}, seed=10 + i, scale=0.02)["h"]
        m.load_state_dict(sd)
        m.save_pretrained(root / f"ft{i}", safe_serialization=not (arch.bin_model and i == 2))
        dirs.append(root / f"ft{i}")
    return root / "base", dirs


@pytest.fixture(scope="module", params=list(ARCHS))
def built(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, _build(ARCHS[request.param], root)


def _config(path, base, models, method, **params):
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
           "parameters": {"normalize": False} if method == "ties" else {},
           "models": [{"model": str(m), "parameters": {"weight": w, **params}}
                      for m, w in zip(models, (0.6, 0.4))]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fastmerge(cfg, out):
    from fastmerge.cli import main
    assert main(["merge", str(cfg), str(out)]) == 0
    return out


def _mergekit(cfg, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    conf = MergeConfiguration.model_validate(yaml.safe_load(cfg.read_text()))
    run_merge(conf, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False,
                                           quiet=True))
    return out


def _run(name: str, out):
    """The output loaded with its AutoModel class and one forward pass: finite, shaped."""
    arch = ARCHS[name]
    model = getattr(transformers, arch.auto).from_pretrained(out).eval()
    with torch.no_grad():
        if arch.image:
            y = model(pixel_values=torch.randn(1, 3, 16, 16, generator=torch.Generator()
                                               .manual_seed(0))).last_hidden_state
            assert y.shape == (1, 5, H)
        elif name == "t5":
            y = model(input_ids=torch.tensor([[3, 4, 5, 2]]),
                      decoder_input_ids=torch.tensor([[0, 6, 7]])).logits
            assert y.shape == (1, 3, V)
        else:
            y = model(input_ids=torch.tensor([[1, 5, 9, 4]])).logits
            assert y.shape == (1, 4, V)
    assert torch.isfinite(y).all()
    return model


def _check_tensor_set(name: str, out, base_dir):
    """The output holds the base's tensors, and its LM head exactly when its config unties."""
    got, want = state_dict_of(out), state_dict_of(base_dir) if list(
        base_dir.glob("*.safetensors")) else None
    cfg = json.loads((out / "config.json").read_text())
    head = ARCHS[name].head
    if head is not None:
        assert (head[0] in got) is (tie_flag(cfg) is False), (name, tie_flag(cfg))
        assert head[1] in got
    if want is not None and head is not None and (head[0] in want) == (head[0] in got):
        assert got.keys() == want.keys()
    return got


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}),
                                           ("ties", {"density": 0.7})])
def test_merge_loads_runs_and_matches_mergekit(built, tmp_path, method, params):
    name, _, (base, models) = built
    if name == "mixtral" and method == "ties":
        # mergekit trims each layer's fused expert tensor (transformers 5 holds them so),
        # fastmerge each expert's tensor as the checkpoint stores it: compare the sign
        # election and the sum, not the top-k
        params = {"density": 1.0}
    cfg = _config(tmp_path / "c.yml", base, models, method, **params)
    out = _fastmerge(cfg, tmp_path / "fm")
    got = _run(name, out).state_dict()
    _check_tensor_set(name, out, base)
    if ARCHS[name].mergekit:
        pytest.skip(ARCHS[name].mergekit)
    # compared as transformers loads both: mergekit writes Mixtral's experts fused (one
    # tensor per layer), as transformers 5 holds them; fastmerge keeps the inputs' names
    want = _run(name, _mergekit(cfg, tmp_path / "mk")).state_dict()
    assert got.keys() == want.keys()
    for k in want:
        off = ~torch.isclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        # ties: mergekit keeps an arbitrary part of the elements tied at the top-k threshold,
        # fastmerge all of them (docs/semantics.md), so an element there may differ
        assert int(off.sum()) <= (1 if method == "ties" else 0), (k, int(off.sum()))


@pytest.mark.parametrize("name", [n for n, a in ARCHS.items() if a.head and n != "t5"
                                  and ARCHS[n].config().tie_word_embeddings])
def test_a_fine_tune_that_unties_its_head(tmp_path, name):
    """A tied base, one fine-tune with its own head: the output holds a merged head (the tied
    models contribute their embedding) and its config unties, so the head is what loads."""
    base, models = _build(ARCHS[name], tmp_path, untied_head=True)
    out = _fastmerge(_config(tmp_path / "c.yml", base, models, "task_arithmetic"),
                     tmp_path / "out")
    got = _check_tensor_set(name, out, base)
    head, embed = ARCHS[name].head
    ins = [state_dict_of(d) if list(d.glob("*.safetensors")) else
           torch.load(d / "pytorch_model.bin", weights_only=True) for d in (base, *models)]
    heads = [sd.get(head, sd[embed]) for sd in ins]
    want = heads[0] + 0.6 * (heads[1] - heads[0]) + 0.4 * (heads[2] - heads[0])
    torch.testing.assert_close(got[head], want)
    model = _run(name, out)
    torch.testing.assert_close(model.get_output_embeddings().weight, want)


def test_t5_inputs_that_disagree_on_tying_are_one_clear_error(tmp_path, capsys):
    """T5's tie_word_embeddings also switches the decoder's output scaling, so a tied T5's
    head is not its embedding: a head some T5 inputs lack is an error, nothing written."""
    base, models = _build(ARCHS["t5"], tmp_path)
    from safetensors.torch import load_file, save_file
    f = models[0] / "model.safetensors"
    sd = load_file(f)
    save_file({**sd, "lm_head.weight": sd["shared.weight"].clone()}, str(f),
              metadata={"format": "pt"})
    from fastmerge.cli import main
    capsys.readouterr()
    assert main(["merge", str(_config(tmp_path / "c.yml", base, models, "task_arithmetic")),
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'lm_head.weight'" in err[0] and "t5" in err[0], err
    assert not (tmp_path / "out").exists()


def test_lines_finds_every_block(built):
    """Every tensor inside a block gets its block's depth, per stack (encoder and decoder,
    text and vision towers each scale over their own blocks); the others none."""
    name, root, (base, _) = built
    names = list(state_dict_of(base)) if list(base.glob("*.safetensors")) else []
    assert names
    assert stack_sizes(names) == ARCHS[name].blocks
    pos = block_position(names)
    for n in names:
        stack = next((s for s in ARCHS[name].blocks if n.startswith(s)), None)
        if stack is None:
            assert pos(n) is None, n
            continue
        i = int(n[len(stack):].split(".")[0])
        assert pos(n) == pytest.approx(i / (ARCHS[name].blocks[stack] - 1)), n


def test_lines_on_clip_with_both_towers():
    """A full CLIP model: text and vision towers are two stacks of their own depths."""
    cfg = T.CLIPConfig(text_config=dict(vocab_size=V, hidden_size=H, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=48),
                       vision_config=dict(hidden_size=H, num_hidden_layers=4,
                                          num_attention_heads=4, intermediate_size=48,
                                          image_size=16, patch_size=8))
    names = list(T.CLIPModel(cfg).state_dict())
    assert stack_sizes(names) == {"text_model.encoder.layers.": 2,
                                  "vision_model.encoder.layers.": 4}
    pos = block_position(names)
    assert pos("vision_model.encoder.layers.3.mlp.fc1.weight") == 1.0
    assert pos("text_model.encoder.layers.1.mlp.fc1.weight") == 1.0
    assert pos("vision_model.encoder.layers.1.mlp.fc1.weight") == pytest.approx(1 / 3)
    assert pos("visual_projection.weight") is None


def test_tie_flag_nested_in_a_sub_config():
    assert tie_flag({"tie_word_embeddings": False}) is False
    assert tie_flag({"text_config": {"tie_word_embeddings": False}}) is False
    assert tie_flag({"tie_word_embeddings": True, "text_config": {
        "tie_word_embeddings": False}}) is True
    assert tie_flag({"vision_config": {}}) is None
    assert ("lm_head.weight", "model.language_model.embed_tokens.weight") in TIED_PAIRS


def _composite(d, head: bool, text_tied: bool, seed: int):
    """A Llava-style checkpoint (language model under model.language_model) whose tie flag
    lives in text_config only."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.language_model.embed_tokens.weight": torch.randn(V, H, generator=g),
          "model.language_model.layers.0.mlp.up_proj.weight": torch.randn(48, H, generator=g)}
    if head:
        sd["lm_head.weight"] = torch.randn(V, H, generator=g)
    return write_safetensors(d, sd, config={"model_type": "llava", "text_config": {
        "model_type": "llama", "tie_word_embeddings": text_tied}})


def test_a_tie_flag_in_text_config_is_read(tmp_path, capsys):
    """A model whose text_config unties yet holds no head is an error (its head is missing);
    a tied base merged with an untied model unties the output in text_config too."""
    from fastmerge.cli import main
    tied = _composite(tmp_path / "tied", False, True, 0)
    untied = _composite(tmp_path / "untied", True, False, 1)
    out = _fastmerge(_config(tmp_path / "a.yml", tied, [untied, tied], "task_arithmetic"),
                     tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert "lm_head.weight" in state_dict_of(out) and tie_flag(cfg) is False
    assert cfg["text_config"] == {"model_type": "llama", "tie_word_embeddings": False}
    broken = _composite(tmp_path / "broken", False, False, 2)
    capsys.readouterr()
    assert main(["merge", str(_config(tmp_path / "b.yml", untied, [broken, untied],
                                      "task_arithmetic")), str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tensor 'lm_head.weight'" in err[0], err
    assert "tie_word_embeddings: false" in err[0] and not (tmp_path / "out2").exists()


def test_lines_scales_t5s_encoder_and_decoder_each_over_its_own_depth(tmp_path):
    base, models = _build(ARCHS["t5"], tmp_path)
    cfg = _config(tmp_path / "c.yml", base, models[:1], "task_arithmetic")
    raw = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**raw, "lines": {"alpha": 0.5, "beta": 0.5}}))
    got, b, m = (state_dict_of(d) for d in (_fastmerge(cfg, tmp_path / "out"), base, models[0]))
    for name, factor in (("encoder.block.1.layer.1.DenseReluDense.wo.weight", 1.0),
                         ("decoder.block.1.layer.2.DenseReluDense.wo.weight", 0.75),
                         ("decoder.block.0.layer.2.DenseReluDense.wo.weight", 0.5),
                         ("shared.weight", 0.5)):
        torch.testing.assert_close(got[name], b[name] + 0.6 * factor * (m[name] - b[name]))
