"""A hub model known from its config.json, its safetensors index and each shard's header,
before any weight is downloaded.

``HubHeaders`` is a ``Checkpoint`` (names, shapes, dtypes, which file holds each tensor, the
config.json in ``dir``) built from ``huggingface_hub.get_safetensors_metadata``, which reads the
headers with HTTP range requests; config.json and the index come through ``hf_hub_download``
into the Hugging Face cache (the snapshot directory ``dir``). Every header goes through
``SafetensorsFile``'s own checks (dtypes, shapes, offsets overlapping or leaving gaps, names
twice), the index through ``Checkpoint``'s (every listed tensor in the shard it names and no
other). What the metadata does not expose cannot be checked here: the header's exact bytes
(repeated keys, JSON oddities) and the file size (bytes after the last tensor); the merge
checks those on the downloaded files. Reading a weight from a ``HeaderOnlyFile`` raises.

A repo of ``.bin`` pickles (no separate header) raises ``NoHeaders``: its tensors can only be
checked after the download. Torch-free."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .hub import unavailable
from .safetensors_file import (
    WEIGHT_INDEX,
    Checkpoint,
    CheckpointError,
    SafetensorsFile,
    model_roots,
    quote,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"


class NoHeaders(CheckpointError):
    """A hub repo whose tensors cannot be checked before its weights are downloaded."""


class HeaderOnlyFile(SafetensorsFile):
    """One hub safetensors file known by its header alone (``meta``: huggingface_hub's
    SafetensorsFileMetadata), checked as a local file's header is; ``path`` names it for
    errors (``org/name/model-00001-of-00002.safetensors``)."""

    def __init__(self, path, meta):
        self.path = Path(path)
        self.tensors = {}
        self.metadata = {}
        self._fd = None
        header = {"__metadata__": meta.metadata} if meta.metadata else {}
        for name, t in meta.tensors.items():
            header[name] = {"dtype": t.dtype, "shape": t.shape,
                            "data_offsets": list(t.data_offsets)}
        raw = json.dumps(header).encode()
        ends = [t.data_offsets[-1] for t in meta.tensors.values()
                if t.data_offsets and type(t.data_offsets[-1]) is int]
        # the file's size is not known before download: the data ends with the last tensor
        self.header_len, self.size = len(raw), 8 + len(raw) + max(ends, default=0)
        self._parse_header(raw)

    def _fileno(self) -> int:
        raise CheckpointError(f"{self.path}: only its header has been fetched from the hub; "
                              f"its weights are not downloaded")


def _hub_file(name: str, rev: Optional[str], filename: str, ref: str) -> Optional[Path]:
    """``filename`` of a hub repo downloaded into the HF cache; None where the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        return Path(hf_hub_download(repo_id=name, filename=filename, revision=rev))
    except EntryNotFoundError:
        return None
    except Exception as exc:  # the hub raises many kinds; all mean "cannot get it"
        raise unavailable(ref, exc) from None


def side_directory(ref: str, name: str, rev: Optional[str], side_files=(),
                   also: Optional[Path] = None) -> Path:
    """The snapshot directory (in the HF cache) holding a hub repo's config.json and
    ``side_files``, downloaded now; no weight. (``Path(ref)``, which holds nothing, for a repo
    with none of them and no other file ``also`` downloaded.)"""
    got = [_hub_file(name, rev, fn, ref) for fn in ("config.json", *side_files)]
    found = next((p for p in [also, *got] if p is not None), None)
    return found.parent if found is not None else Path(ref)


def _hub_metadata(fetch, missing: type, ref: str, what: str):
    """``fetch()`` (a hub safetensors-metadata call); ``missing`` (the hub's "no such file"
    error) becomes NoHeaders(``what`` + why the tensors cannot be checked), any other error
    an unavailable hub."""
    try:
        return fetch()
    except missing:
        raise NoHeaders(f"{what}: its tensors cannot be checked before download "
                        f"(pickles have no separate header)") from None
    except Exception as exc:
        raise unavailable(ref, exc) from None


class HubHeaders(Checkpoint):
    """Hub model ``ref`` (repo ``name`` at ``rev``) from config.json, the index and its
    shards' headers; ``side_files``: other small files fetched beside config.json (the
    tokenizer's, when the merge builds a vocabulary)."""

    def __init__(self, ref: str, name: str, rev: Optional[str], label: str = "",
                 side_files=()):
        from huggingface_hub import get_safetensors_metadata
        from huggingface_hub.errors import NotASafetensorsRepoError
        self.label = label or ref
        meta = _hub_metadata(
            lambda: get_safetensors_metadata(name, revision=rev), NotASafetensorsRepoError, ref,
            f"model {quote(ref)}: the hub repo has no model.safetensors or {WEIGHT_INDEX} "
            f"(.bin weights?)")
        index = _hub_file(name, rev, WEIGHT_INDEX, ref) if meta.sharded else None
        # config.json (read by the merge as ``dir / "config.json"``) sits in the snapshot
        self.dir = side_directory(ref, name, rev, side_files, index)
        self._roots = model_roots(self.dir)
        shown = Path(ref.rsplit("@", 1)[0] if rev else ref)
        self.files, self.where = {}, {}
        for fn, fmeta in sorted(meta.files_metadata.items()):
            self._add_shard(fn, HeaderOnlyFile(shown / fn, fmeta))
        if index is not None:
            self._check_index(index, self._read_index(index), "that file's header")
        self._check_side_files()


def adapter_headers(ref: str, name: str, rev: Optional[str]):
    """(directory holding adapter_config.json, HeaderOnlyFile of the adapter's weights) of a
    hub LoRA adapter, without downloading its weights."""
    from huggingface_hub import parse_safetensors_file_metadata
    from huggingface_hub.errors import EntryNotFoundError
    cfg = _hub_file(name, rev, ADAPTER_CONFIG, ref)
    if cfg is None:
        raise CheckpointError(f"adapter {quote(ref)}: the hub repo has no {ADAPTER_CONFIG} "
                              f"(not a peft adapter?)")
    meta = _hub_metadata(
        lambda: parse_safetensors_file_metadata(name, ADAPTER_SAFETENSORS, revision=rev),
        EntryNotFoundError, ref,
        f"adapter {quote(ref)}: the hub repo has no {ADAPTER_SAFETENSORS} (adapter_model.bin?)")
    shown = Path(ref.rsplit("@", 1)[0] if rev else ref)
    return cfg.parent, HeaderOnlyFile(shown / ADAPTER_SAFETENSORS, meta)
