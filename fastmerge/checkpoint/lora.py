"""A LoRA adapter over its base model (mergekit's ``base+adapter`` reference) as one source:
each adapted tensor is ``W + scale * B @ A``, computed when a chunk of it is read, a block of
rows at a time, and nothing merged is written to disk. peft's rules (peft 0.21,
``merge_and_unload``): ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
``use_rslora``, per module through ``rank_pattern`` / ``alpha_pattern``; ``fan_in_fan_out``
(GPT-2's Conv1D, weights stored [in, out]) and embeddings (``lora_embedding_A/B``) transpose
the product; ``modules_to_save`` tensors and saved embedding layers (``base_layer.weight``)
replace the base's. The adapter weights come from ``adapter_model.safetensors`` (or
``adapter_model.bin``, loaded weights-only).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .safetensors_file import (
    MERGEABLE_ST,
    CheckpointError,
    SafetensorsFile,
    element_buffer,
    json_reason,
    model_roots,
    open_regular,
    quote,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
BLOCK_ELEMS = 1 << 18   # float32 elements per block of rows: bounds the scratch of a chunk
_PAIR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                   r"(\.weight)?$")
_SAVED_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
_REFUSED = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)",
            "trainable_token_indices": "trainable tokens (trainable_token_indices)"}


@dataclass
class Delta:
    """One adapted tensor: ``scale * B @ A`` (``transposed``: ``(B @ A).T``)."""
    a_key: str
    b_key: str
    scale: float
    transposed: bool


def _inside(directory: Path, name: str) -> Path:
    """``directory / name``, refused unless it resolves inside the adapter directory."""
    p = directory / name
    real = Path(os.path.realpath(p))
    if not any(r in real.parents for r in model_roots(directory)):
        raise CheckpointError(f"adapter {directory}: file {quote(name)} resolves to "
                              f"{quote(str(real), 160)}, outside the adapter directory; refused")
    return p


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json, checked to describe a plain LoRA adapter fastmerge can apply."""
    path = directory / ADAPTER_CONFIG
    if not os.path.lexists(path):
        raise CheckpointError(f"adapter {directory}: no {ADAPTER_CONFIG} (not a peft adapter "
                              f"directory?)")
    with open_regular(_inside(directory, ADAPTER_CONFIG), ADAPTER_CONFIG) as f:
        raw = f.read()
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({json_reason(exc)})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    kind = cfg.get("peft_type")
    if str(kind).upper() != "LORA":
        raise CheckpointError(f"{path}: peft_type is {quote(kind)}; only LoRA adapters "
                              f"(peft_type LORA) can be merged into their base")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise CheckpointError(f"{path}: {what} is not supported; merge this adapter with "
                                  f"peft's merge_and_unload first")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive number, got "
                                  f"{quote(cfg.get(key))}")
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first pattern matching the module's name, else the default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targeted(cfg: dict, module: str) -> bool:
    """peft's check_target_module_exists for a module the adapter holds weights of."""
    exclude = cfg.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, module) if isinstance(exclude, str) else
                    any(module == e or module.endswith("." + e) for e in exclude)):
        return False
    targets = cfg.get("target_modules")
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or ())


def _saved_module(cfg: dict, name: str) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in cfg.get("modules_to_save") or ())


def _open_weights(directory: Path):
    for fn in ADAPTER_WEIGHTS:
        if os.path.lexists(directory / fn):
            p = _inside(directory, fn)
            if fn.endswith(".bin"):
                from .bin_file import BinFile
                return BinFile(p)
            return SafetensorsFile(p)
    raise CheckpointError(f"adapter {directory}: no {' or '.join(ADAPTER_WEIGHTS)}")


class LoraCheckpoint:
    """``base`` (a Checkpoint or BinCheckpoint) with the adapter in ``adapter_dir`` applied
    (``adapter``: its weights file already opened, e.g. a hub adapter's header alone)."""
    copies_chunks = True   # each chunk computed: base + the adapter's delta

    def __init__(self, base, adapter_dir, label: str = "", adapter=None):
        self.base = base
        self.adapter_dir = Path(adapter_dir)
        self.label = label or f"{base.label}+{adapter_dir}"
        self.dir = base.dir                   # config and tokenizer come from the base
        cfg = read_adapter_config(self.adapter_dir)
        self.rslora = bool(cfg.get("use_rslora"))
        self.adapter = adapter if adapter is not None else _open_weights(self.adapter_dir)
        self.deltas: dict[str, Delta] = {}
        self.replaced: dict[str, str] = {}   # base tensor -> adapter tensor replacing it
        pairs: dict[str, dict] = {}
        for key in self.adapter.tensors:
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = _PAIR.match(name)
            if m:
                pairs.setdefault(m["module"], {})[m["kind"][-1]] = key
                pairs[m["module"]]["embedding"] = "embedding" in m["kind"]
                continue
            m = _SAVED_LAYER.match(name)
            target = f"{m['module']}.weight" if m else name.replace(".modules_to_save", "")
            if not m and not _saved_module(cfg, target):
                self._fail(key, f"neither a LoRA weight nor under modules_to_save "
                                f"{cfg.get('modules_to_save')}")
            self._check_same(key, target)
            self.replaced[target] = key
        for module, pair in pairs.items():
            self._add_delta(cfg, module, pair)

    def _fail(self, key: str, why: str):
        raise CheckpointError(f"{self.adapter.path}, tensor {quote(key)}: {why}")

    def _check_same(self, key: str, target: str) -> None:
        if target not in self.base.where:
            self._fail(key, f"the base model {quote(self.base.label)} has no tensor "
                            f"{quote(target)} (an adapter of another model?)")
        a, b = self.adapter.info(key), self.base.info(target)
        if a.shape != b.shape:
            self._fail(key, f"shape {list(a.shape)} does not match {list(b.shape)} of "
                            f"{quote(target)} in {self.base.path_of(target)}")

    def _add_delta(self, cfg: dict, module: str, pair: dict) -> None:
        if "A" not in pair or "B" not in pair:
            self._fail(pair.get("A") or pair.get("B"), "its lora_A/lora_B partner is missing")
        a_key, b_key = pair["A"], pair["B"]
        if not _targeted(cfg, module):
            self._fail(a_key, f"module {quote(module)} is not in target_modules "
                              f"{quote(cfg.get('target_modules'))}")
        target = f"{module}.weight"
        if target not in self.base.where:
            self._fail(a_key, f"the base model {quote(self.base.label)} has no tensor "
                              f"{quote(target)} (an adapter of another model?)")
        w = self.base.info(target)
        transposed = pair["embedding"] or bool(cfg.get("fan_in_fan_out"))
        r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        if len(w.shape) != 2 or w.st not in MERGEABLE_ST:
            self._fail(a_key, f"the base tensor {quote(target)} is {list(w.shape)} "
                              f"{w.st}, not a 2-D float weight a LoRA can adapt")
        rows, cols = w.shape
        want_a, want_b = ((r, rows), (cols, r)) if transposed else ((r, cols), (rows, r))
        for key, want in ((a_key, want_a), (b_key, want_b)):
            got = self.adapter.info(key)
            if tuple(got.shape) != want or got.st not in MERGEABLE_ST:
                self._fail(key, f"shape {list(got.shape)} does not fit the base tensor "
                                f"{quote(target)} of shape {list(w.shape)} in "
                                f"{self.base.path_of(target)} with r={r} (expected "
                                f"{list(want)}; an adapter of another model?)")
        scale = alpha / math.sqrt(r) if self.rslora else alpha / r
        self.deltas[target] = Delta(a_key, b_key, float(scale), transposed)

    # --- Checkpoint's interface
    @property
    def names(self) -> list:
        return self.base.names

    @property
    def where(self) -> dict:
        return self.base.where

    def info(self, name: str):
        return self.base.info(name)

    def path_of(self, name: str) -> Path:
        return self.base.path_of(name)

    def read(self, name: str, start: int = 0, stop: Optional[int] = None, out=None):
        if name not in self.deltas:
            src = self.adapter if name in self.replaced else self.base
            return src.read(self.replaced.get(name, name), start, stop, out)
        return self._merged(name, start, self.info(name).numel if stop is None else stop, out)

    def map(self, name: str, start: int = 0, stop: Optional[int] = None):
        if name not in self.deltas and name not in self.replaced:
            return self.base.map(name, start, stop)
        return self.read(name, start, stop)

    def view(self, name: str, start: int = 0, stop: Optional[int] = None) -> memoryview:
        if name not in self.deltas and name not in self.replaced:
            return self.base.view(name, start, stop)
        import torch
        t = self.read(name, start, stop)
        return memoryview(t.view(torch.uint8).numpy()).toreadonly()

    def _merged(self, name: str, start: int, stop: int, out):
        """Elements [start, stop) of ``W + scale * B @ A``, rounded once to W's dtype; the
        product is formed in float32 for blocks of at most BLOCK_ELEMS elements of rows."""
        d, info = self.deltas[name], self.info(name)
        dst = element_buffer(info, stop - start, out)
        if stop == start:
            return dst
        a = self.adapter.read(d.a_key).float().reshape(self.adapter.info(d.a_key).shape)
        b = self.adapter.read(d.b_key).float().reshape(self.adapter.info(d.b_key).shape)
        src = self.adapter if name in self.replaced else self.base
        src_name = self.replaced.get(name, name)
        cols = info.shape[1]
        step = max(1, BLOCK_ELEMS // max(1, cols))
        for r0 in range(start // cols, -(-stop // cols), step):
            r1 = min(r0 + step, info.shape[0])
            e0, e1 = max(start, r0 * cols), min(stop, r1 * cols)
            rows = (a[:, r0:r1].T @ b.T) if d.transposed else (b[r0:r1] @ a)
            rows = rows.reshape(-1)[e0 - r0 * cols:e1 - r0 * cols]
            w = src.read(src_name, e0, e1).float()
            dst[e0 - start:e1 - start] = w.add_(rows, alpha=d.scale).to(dst.dtype)
        return dst

    def close(self) -> None:
        self.base.close()
        self.adapter.close()
