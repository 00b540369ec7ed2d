"""``tokenizer_source`` over inputs whose vocabularies differ, with mergekit 0.1.5's meaning:
the output tokenizer is built (``union``: the base's tokens keep their ids, then every other
input's tokens in input order, then their added tokens; ``base`` / ``model:<ref>``: that
tokenizer), and each input's embedding / LM-head rows are re-ordered to it by token
(checkpoint/row_map.py), so the merge runs over aligned rows through the normal passes.

A token an input lacks gets, in that input (mergekit's ``assign_embedding_sources``):
- held by exactly one input: that input's row;
- held by none: zeros;
- held by the base (two or more hold it): the base's row;
- otherwise: the mean of the rows of the inputs that hold it.
``pad_to_multiple_of`` pads with each input's mean token row. A token whose id is at or past a
model's ``vocab_size`` (config.json, else its embedding rows) is not that model's.
With ``base`` / ``model:<ref>`` and equal vocabulary sizes nothing is re-ordered (the
tokenizer files are copied), as before.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..checkpoint.embeddings import VOCAB_TENSORS, model_config
from ..checkpoint.row_map import MEAN, PAD, ZERO, RowMap, RowMappedSource
from ..checkpoint.safetensors_file import CheckpointError, quote
from ..recipe.config import MergeConfig


def vocab_tensors(source) -> list:
    """The token-indexed tensors of a source (embeddings, LM heads), by name."""
    return [n for n in source.names if n in VOCAB_TENSORS or n.endswith(
        tuple("." + v for v in VOCAB_TENSORS))]


def source_key(cfg: MergeConfig) -> str:
    return "tokenizer_source" if "tokenizer_source" in cfg.raw else "tokenizer.source"


def pad_multiple(cfg: MergeConfig) -> Optional[int]:
    block = cfg.raw.get("tokenizer")
    return block.get("pad_to_multiple_of") if isinstance(block, dict) else None


def load_tokenizer(directory: Path, what: str):
    """A fast tokenizer from a model directory; one line when it does not load."""
    import logging

    import transformers
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), use_fast=True,
                                                           local_files_only=True)
    except Exception as exc:   # transformers raises many kinds for a broken tokenizer
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{what}: the tokenizer in {directory} does not load "
                              f"({reason})") from None
    finally:
        quiet.setLevel(level)


def vocab_limit(source, names: list) -> int:
    """Ids at or past this are not the model's tokens (mergekit: config vocab_size)."""
    rows = min(source.info(n).shape[0] for n in names)
    v = model_config(source).get("vocab_size")
    return min(rows, v) if isinstance(v, int) and v > 0 else rows


def union_tokenizer(base_tok, toks: list, limits: list):
    """mergekit's build_union_tokenizer: the base's tokenizer (a fresh copy) with every other
    input's ordinary tokens appended in input order, then all inputs' added tokens (the first
    input's settings win for a token added twice). Within one input its new tokens come in
    id order (mergekit's follows the tokenizer's hash-map order, which varies by run)."""
    import transformers
    ordinary: dict = {}
    added: dict = {}
    for tok, limit in zip(toks, limits):
        dec = tok.added_tokens_decoder
        contents = {v.content for v in dec.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < limit and t not in contents and t not in ordinary:
                ordinary[t] = len(ordinary)
        for i, info in dec.items():
            if i < limit and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as d:
        base_tok.save_pretrained(d)
        out = transformers.AutoTokenizer.from_pretrained(d, use_fast=True)
    have = base_tok.get_vocab()
    for t in ordinary:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def _permutation(vocab_out: dict, vocab: dict, limit: int):
    import numpy as np
    p = np.full(len(vocab_out), -1, dtype=np.int64)
    for t, i in vocab_out.items():
        j = vocab.get(t)
        if j is not None and j < limit:
            p[i] = j
    return p


def row_maps(perms: list, has_base: bool, rows: int):
    """(src, row) per input over ``rows`` output rows, by mergekit's rules (module doc)."""
    import numpy as np
    tokens = len(perms[0])
    held = np.stack([p >= 0 for p in perms])          # [inputs, tokens]
    count = held.sum(0)
    first = held.argmax(0)
    fill_src = np.where(count == 1, first, MEAN)
    fill_src = np.where(count == 0, ZERO, fill_src)
    if has_base:
        fill_src = np.where((count >= 2) & held[0], 0, fill_src)
    fill_row = np.where(fill_src >= 0,
                        np.stack(perms)[np.maximum(fill_src, 0), np.arange(tokens)], -1)
    maps = []
    for i, p in enumerate(perms):
        src = np.full(rows, PAD, dtype=np.int64)
        row = np.full(rows, -1, dtype=np.int64)
        src[:tokens] = np.where(held[i], i, fill_src)
        row[:tokens] = np.where(held[i], p, fill_row)
        maps.append((src, row))
    return maps


class Vocabulary:
    """What ``open_inputs`` calls on the opened sources (``adapt``), and what the merge keeps
    of it: the output tokenizer's directory and the config keys to set."""

    def __init__(self, cfg: MergeConfig, source_dir: Optional[Path]):
        self.cfg, self.source_dir = cfg, source_dir    # source_dir: model:<ref>'s directory
        self.tokenizer_dir: Optional[Path] = None
        self._tmp: Optional[str] = None

    def adapt(self, sources: list, has_base: bool) -> tuple[list, dict]:
        cfg = self.cfg
        names = [n for n in vocab_tensors(sources[0])
                 if all(n in s.where for s in sources)]
        if not names:
            return sources, {}
        limits = [vocab_limit(s, names) for s in sources]
        rows = {s.info(n).shape[0] for s in sources for n in names}
        tok_ref = cfg.tokenizer_model
        if cfg.tokenizer_source != "union" and len(rows) == 1 and tok_ref is None:
            return sources, {}
        labels = ["base_model" if has_base and i == 0 else
                  f"models[{i - 1 if has_base else i}]" for i in range(len(sources))]
        toks = [load_tokenizer(s.dir, f"{labels[i]} {quote(s.label)}")
                for i, s in enumerate(sources)]
        if cfg.tokenizer_source == "union":
            out = union_tokenizer(toks[0], toks, limits)
        elif tok_ref is not None:
            out = load_tokenizer(self.source_dir, f"{source_key(cfg)} {quote(tok_ref)}")
            if len(rows) == 1 and len(out.get_vocab()) == rows.pop():
                return sources, {}
        else:
            out = toks[0]
        vocab_out = out.get_vocab()
        if sorted(vocab_out.values()) != list(range(len(vocab_out))):
            raise CheckpointError(f"{source_key(cfg)}: the output tokenizer's ids are not "
                                  f"0..{len(vocab_out) - 1} (holes in its vocabulary)")
        size = len(vocab_out)
        pad = pad_multiple(cfg)
        if pad and size % pad:
            size += pad - size % pad
        perms = [_permutation(vocab_out, t.get_vocab(), lim) for t, lim in zip(toks, limits)]
        maps = row_maps(perms, has_base, size)
        for n in names:
            cols = [tuple(s.info(n).shape[1:]) for s in sources]
            if len(set(cols)) > 1:
                raise CheckpointError(f"tensor {quote(n)}: the inputs' rows differ in shape "
                                      f"({cols[0]} vs {next(c for c in cols if c != cols[0])})")
        wrapped = [RowMappedSource(s, {n: RowMap(src, row, perms) for n in names}, sources)
                   for s, (src, row) in zip(sources, maps)]
        self._write_tokenizer(out, sources[0])
        return wrapped, {"vocab_size": size}

    def _write_tokenizer(self, tok, reference) -> None:
        """The output tokenizer saved (transformers' files) with the reference's
        generation_config.json beside it: the writer copies its files from one directory."""
        self._tmp = tempfile.mkdtemp(prefix="fastmerge-tokenizer-")
        tok.save_pretrained(self._tmp)
        _drop_load_options(Path(self._tmp) / "tokenizer_config.json")
        gen = Path(reference.dir) / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, Path(self._tmp) / gen.name)
        self.tokenizer_dir = Path(self._tmp)

    def cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


# How transformers loaded this copy (offline or not), not a property of the tokenizer: left
# in, the output's files would depend on the environment of the run that wrote them.
_LOAD_OPTIONS = ("local_files_only", "is_local", "_commit_hash")


def _drop_load_options(path: Path) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if any(k in config for k in _LOAD_OPTIONS):
        for k in _LOAD_OPTIONS:
            config.pop(k, None)
        path.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")


def vocabulary_for(cfg: MergeConfig, source_dir: Optional[Path]) -> Optional[Vocabulary]:
    """The Vocabulary step of a merge whose config sets a tokenizer source, else None."""
    if cfg.tokenizer_source is None:
        return None
    return Vocabulary(cfg, source_dir)

