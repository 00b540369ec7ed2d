"""A model reference -> the source a merge reads: a safetensors directory (Checkpoint), a
``.bin`` directory (BinCheckpoint), or mergekit's ``base+adapter`` (LoraCheckpoint over
either). The source class is chosen by the files present; safetensors wins when a directory
holds both. Torch-free until a ``.bin`` file or an adapter is actually read."""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Optional

from .bin_file import BIN_INDEX, BinCheckpoint, bin_files_in
from .hub import cached_snapshot, hub_offline, hub_reference, resolve_model
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


class HeadersOnly:
    """hub_headers_only's state: the side files fetched beside config.json, and the hub
    models met whose tensors cannot be checked before download (NoHeaders' lines)."""

    def __init__(self, side_files=()):
        self.side_files, self.unchecked = tuple(side_files), []


_HEADERS_ONLY: ContextVar = ContextVar("fastmerge_hub_headers_only", default=None)


@contextmanager
def hub_headers_only(side_files=()):
    """Within it, open_model opens a hub model that is not in the local cache from its
    config.json, index and safetensors headers alone (hub_headers.HubHeaders; a ``.bin``-only
    repo raises hub_headers.NoHeaders) and resolve_model gives the snapshot directory holding
    those files: no weight is downloaded. A cached model opens from the cache, and offline
    (HF_HUB_OFFLINE) an uncached one fails as it always does. Yields the HeadersOnly."""
    state = HeadersOnly(side_files)
    token = _HEADERS_ONLY.set(state)
    try:
        yield state
    finally:
        _HEADERS_ONLY.reset(token)


def headers_only_active() -> bool:
    return _HEADERS_ONLY.get() is not None


def _uncached_hub(ref: str, config_dir: Optional[Path]):
    """(local directory or None, (repo id, revision) or None): the hub id when ``ref`` is one
    to be read from its headers now (hub_headers_only, not cached, online)."""
    local, hub = hub_reference(ref, config_dir)
    if local is not None:
        return local, None
    if _HEADERS_ONLY.get() is None or hub_offline():
        return None, None
    cached = cached_snapshot(*hub)
    return (cached, None) if cached is not None else (None, hub)


def model_directory(ref: str, config_dir: Optional[Path] = None) -> Path:
    """resolve_model, but within hub_headers_only an uncached hub model gives the snapshot
    directory of its config.json (and side files) without its weights."""
    local, hub = _uncached_hub(ref, config_dir)
    if hub is None:
        return local if local is not None else resolve_model(ref, config_dir)
    from .hub_headers import side_directory
    return side_directory(ref, *hub, _HEADERS_ONLY.get().side_files)


def _open_side(ref: str, config_dir: Optional[Path], label: str):
    local, hub = _uncached_hub(ref, config_dir)
    if hub is None:
        return open_directory(local if local is not None else resolve_model(ref, config_dir),
                              label=label)
    from .hub_headers import HubHeaders, NoHeaders
    state = _HEADERS_ONLY.get()
    try:
        return HubHeaders(ref, *hub, label=label, side_files=state.side_files)
    except NoHeaders as exc:
        state.unchecked.append(str(exc))
        raise


def open_model(ref: str, config_dir: Optional[Path] = None):
    """The source a model reference names (paths relative to ``config_dir`` too; hub ids
    through hub.resolve_model on either side of a '+', or from their headers alone within
    hub_headers_only)."""
    model, adapter = split_lora_reference(ref, config_dir)
    base = _open_side(model, config_dir, model)
    if adapter is None:
        return base
    from .lora import LoraCheckpoint
    try:
        local, hub = _uncached_hub(adapter, config_dir)
        if hub is None:
            return LoraCheckpoint(base, local if local is not None else
                                  resolve_model(adapter, config_dir), label=ref)
        from .hub_headers import NoHeaders, adapter_headers
        try:
            adapter_dir, weights = adapter_headers(adapter, *hub)
        except NoHeaders as exc:
            _HEADERS_ONLY.get().unchecked.append(str(exc))
            raise
        return LoraCheckpoint(base, adapter_dir, label=ref, adapter=weights)
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
