"""A model reference -> the source a merge reads: a safetensors directory (Checkpoint), a
``.bin`` directory (BinCheckpoint), or mergekit's ``base+adapter`` (LoraCheckpoint over
either). The source class is chosen by the files present; safetensors wins when a directory
holds both. Torch-free until a ``.bin`` file or an adapter is actually read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .bin_file import BIN_INDEX, BinCheckpoint, bin_files_in
from .hub import resolve_model
from .safetensors_file import WEIGHT_INDEX, Checkpoint, CheckpointError, quote


def split_lora_reference(ref: str, config_dir: Optional[Path] = None) -> tuple:
    """mergekit's ``model+lora`` -> (model, lora); (ref, None) for a plain reference or for a
    path that exists with a '+' in its name."""
    if not isinstance(ref, str) or "+" not in ref:
        return ref, None
    p = Path(os.path.expanduser(ref))
    if p.exists() or (config_dir is not None and not p.is_absolute()
                      and (config_dir / p).exists()):
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(x.strip() for x in parts):
        raise CheckpointError(f"model {quote(ref)}: a LoRA reference is 'base+adapter', with "
                              f"exactly one '+'")
    return parts[0], parts[1]


def open_directory(directory: Path, label: str = ""):
    """The source for a model directory, by the weight files it holds."""
    d = Path(directory)
    has_st = os.path.lexists(d / WEIGHT_INDEX) or any(d.glob("*.safetensors"))
    if not has_st and (os.path.lexists(d / BIN_INDEX) or bin_files_in(d)):
        return BinCheckpoint(d, label=label)
    return Checkpoint(d, label=label)


def open_model(ref: str, config_dir: Optional[Path] = None):
    """The source a model reference names (paths relative to ``config_dir`` too; hub ids
    through hub.resolve_model on either side of a '+')."""
    model, adapter = split_lora_reference(ref, config_dir)
    base = open_directory(resolve_model(model, config_dir), label=model)
    if adapter is None:
        return base
    from .lora import LoraCheckpoint
    try:
        return LoraCheckpoint(base, resolve_model(adapter, config_dir), label=ref)
    except BaseException:
        base.close()
        raise


def local_paths(ref: str, config_dir: Optional[Path] = None) -> list:
    """The local paths a reference may name (both sides of 'base+adapter')."""
    try:
        model, adapter = split_lora_reference(ref, config_dir)
    except CheckpointError:
        return [ref]
    return [model] + ([adapter] if adapter is not None else [])
