"""Token embeddings across inputs: tied LM heads and differing vocabularies.

Tied embeddings (mergekit's rule: ``lm_head`` is optional, and a model without one uses its
``tied_names``, the input embedding, in its place):
- no input holds the LM head: the output has none either, and its config ties as the base's;
- every input holds it: it is merged like any tensor;
- some do: the output has an LM head, merged over every model, where a model without one
  contributes its own input embedding (what its tied head is); a model whose config.json says
  ``tie_word_embeddings: false`` yet holds no head is an error (its head is missing, not
  tied). The output config then gets ``tie_word_embeddings: false``, so transformers loads
  the merged head instead of re-tying it to the embedding (mergekit copies the base config
  as it is, and a tied base would drop the merged head on load).
A head is never made from nothing: only a model's own embedding stands in for its head.
"""
from __future__ import annotations

import json
from typing import Optional

from .safetensors_file import CheckpointError, quote

# (LM head, the input embedding it is tied to), as in mergekit's architecture definitions
TIED_PAIRS = (("lm_head.weight", "model.embed_tokens.weight"),      # Llama, Qwen2, Gemma, ...
              ("lm_head.weight", "transformer.wte.weight"),         # GPT-2
              ("lm_head.weight", "shared.weight"),                  # T5
              ("cls.predictions.decoder.weight",                    # BERT masked LM
               "bert.embeddings.word_embeddings.weight"),
              ("cls.predictions.decoder.bias", "cls.predictions.bias"),
              ("embed_out.weight", "gpt_neox.embed_in.weight"),
              ("lm_head.weight", "model.language_model.embed_tokens.weight"),
              ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight"))
TIE_KEY = "tie_word_embeddings"
# composite models keep the language model's flag in a sub-config; the first one found counts
SUB_CONFIGS = ("text_config", "language_config", "llm_config", "decoder", "thinker_config")
# their tie_word_embeddings also switches the decoder output's scaling (d_model ** -0.5), so a
# tied model's head is not its embedding
SCALED_WHEN_TIED = ("t5", "mt5", "umt5", "longt5")
VOCAB_TENSORS = {n for pair in TIED_PAIRS for n in pair} | {"embed_tokens.weight",
                                                              "word_embeddings.weight",
                                                              "shared.weight"}


def tie_flag(cfg: dict) -> Optional[bool]:
    """A config.json's tie_word_embeddings: its own, else a sub-config's (text_config ...);
    None where none says (transformers' default then applies)."""
    if isinstance(cfg.get(TIE_KEY), bool):
        return cfg[TIE_KEY]
    for key in SUB_CONFIGS:
        sub = cfg.get(key)
        if isinstance(sub, dict) and isinstance(sub.get(TIE_KEY), bool):
            return sub[TIE_KEY]
    return None


def untie_updates(cfg: dict) -> dict:
    """The config.json keys that untie a model: the flag, and where a sub-config holds one,
    that sub-config with it false too (transformers reads the language model's from there)."""
    out: dict = {TIE_KEY: False}
    for key in SUB_CONFIGS:
        sub = cfg.get(key)
        if isinstance(sub, dict) and TIE_KEY in sub:
            out[key] = {**sub, TIE_KEY: False}
    return out


def model_config(source) -> dict:
    """The config.json of a source's model directory ({} where it has none)."""
    p = source.dir / "config.json"
    try:
        with open(p, "rb") as f:
            cfg = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


class TiedHead:
    """A source whose missing LM head reads as its input embedding (what a tied head is)."""

    def __init__(self, inner, head: str, embed: str):
        self.inner, self.head, self.embed = inner, head, embed
        self.where = {**inner.where, head: inner.where[embed]}

    def __getattr__(self, attr):        # dir, label, files ... of the wrapped source
        return getattr(self.inner, attr)

    def _n(self, name: str) -> str:
        return self.embed if name == self.head else name

    @property
    def names(self) -> list:
        return [*self.inner.names, self.head]

    def info(self, name: str):
        return self.inner.info(self._n(name))

    def path_of(self, name: str):
        return self.inner.path_of(self._n(name))

    def read(self, name, start=0, stop=None, out=None):
        return self.inner.read(self._n(name), start, stop, out)

    def map(self, name, start=0, stop=None):
        return self.inner.map(self._n(name), start, stop)

    def view(self, name, start=0, stop=None):
        return self.inner.view(self._n(name), start, stop)

    def close(self) -> None:
        self.inner.close()


def reconcile_tied_heads(sources: list) -> tuple[list, dict]:
    """(the sources, those lacking a head some others hold wrapped in TiedHead; the keys to
    set in the output config.json). ``sources[0]`` is the reference (the base)."""
    overrides: dict = {}
    for head, embed in TIED_PAIRS:
        if not all(embed in s.where for s in sources):
            continue
        holders = [head in s.where for s in sources]
        if all(holders) or not any(holders):
            continue
        for i, s in enumerate(sources):
            if holders[i]:
                continue
            cfg = model_config(s)
            if cfg.get("model_type") in SCALED_WHEN_TIED:
                raise CheckpointError(
                    f"model {quote(s.label)} ({s.dir}) has no tensor {quote(head)} that other "
                    f"inputs hold; a {cfg['model_type']} model's {TIE_KEY} also scales its "
                    f"decoder output, so its embedding does not stand in for a head: merge "
                    f"models that agree on tying")
            if tie_flag(cfg) is False:
                raise CheckpointError(
                    f"model {quote(s.label)} ({s.dir}) has no tensor {quote(head)} and its "
                    f"config.json sets {TIE_KEY}: false, so its head is missing, not tied "
                    f"(other inputs hold one)")
            sources[i] = TiedHead(s, head, embed)
        base_cfg = model_config(sources[0])
        if tie_flag(base_cfg) is not False:
            overrides.update(untie_updates(base_cfg))
    return sources, overrides


def vocab_hint(name: str, shape_a, shape_b) -> Optional[str]:
    """What to say when two inputs' shapes of ``name`` differ in their number of tokens."""
    if len(shape_a) != len(shape_b) or not shape_a or list(shape_a[1:]) != list(shape_b[1:]):
        return None
    if name not in VOCAB_TENSORS and not name.endswith(tuple(VOCAB_TENSORS)):
        return None
    return (f"the inputs have different vocabularies ({shape_a[0]} vs {shape_b[0]} tokens); "
            f"set tokenizer_source: union (or base, or model:<path>) to merge the rows by "
            f"token (docs/semantics.md)")
