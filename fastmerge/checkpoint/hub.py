"""Model references: a local directory, or a Hugging Face hub id ``org/name[@revision]``
resolved through huggingface_hub's cache (downloads only the files a merge reads; honours
HF_HUB_OFFLINE / HF_HUB_CACHE like every other HF tool). Before that download a merge checks
the model from its headers alone (hub_headers.py, sources.hub_headers_only)."""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Optional

from .safetensors_file import CheckpointError, quote

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# what a merge reads from a hub repo: weights, index, config, tokenizer, generation config
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt",
                  "vocab.txt", "*.jinja", "*.txt"]
# fetched only when a repo has no safetensors weights (many hold both formats)
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]


def split_reference(ref: str) -> tuple[str, Optional[str]]:
    """'org/name@rev' -> ('org/name', 'rev'); a path -> (path, None)."""
    if "@" in ref and not os.path.exists(ref):
        name, rev = ref.rsplit("@", 1)
        return name, (rev or None)
    return ref, None


def hub_reference(ref, config_dir: Optional[Path] = None):
    """``(local directory, None)`` for a reference to a directory here, ``(None, (repo id,
    revision))`` for a hub id; one line for anything else."""
    if not isinstance(ref, str) or not ref.strip():
        raise CheckpointError(f"a model reference must be a path or hub id, got {quote(ref)}")
    if "\0" in ref:
        raise CheckpointError(f"model {quote(ref)}: a path cannot hold a NUL character")
    p = Path(os.path.expanduser(ref))
    candidates = [p] if p.is_absolute() else [p] + ([config_dir / p] if config_dir else [])
    for c in candidates:
        kind = _kind(c, ref)
        if kind == "dir":
            return c.resolve(), None
        if kind == "other":
            raise CheckpointError(f"model {quote(ref)}: {quote(str(c))} is a file, not a model "
                                  f"directory")
    name, rev = split_reference(ref)
    looks_local = ref.startswith((".", "/", "~")) or not HUB_ID.match(name)
    if looks_local:
        raise CheckpointError(f"model {quote(ref)}: no such directory (and not a hub id "
                              f"org/name)")
    return None, (name, rev)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(name: str, rev: Optional[str]) -> Optional[Path]:
    """The local snapshot of a hub repo when its weights are in the cache (no network), else
    None. A snapshot holding only config.json and the index (what a header check fetched) is
    not a cached model."""
    try:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(repo_id=name, revision=rev, allow_patterns=ALLOW_PATTERNS,
                                      local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or no huggingface_hub
        return None
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                shards = set(json.loads((path / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return path   # a broken index: the merge's own checks say so
            return path if all((path / s).exists() for s in shards) else None
    weights = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin")
    return path if any(any(path.glob(w)) for w in weights) else None


def resolve_model(ref, config_dir: Optional[Path] = None) -> Path:
    """The local directory holding model ``ref`` (downloading it to the HF cache if needed)."""
    local, hub = hub_reference(ref, config_dir)
    if local is not None:
        return local
    name, rev = hub
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise CheckpointError(f"model {quote(ref)}: not a local directory and huggingface_hub is "
                              f"not installed") from None
    offline = hub_offline()
    try:
        path = snapshot_download(repo_id=name, revision=rev, allow_patterns=ALLOW_PATTERNS,
                                 local_files_only=offline)
        if not any(Path(path).glob("*.safetensors")):   # a repo of .bin weights only
            path = snapshot_download(repo_id=name, revision=rev, allow_patterns=BIN_PATTERNS,
                                     local_files_only=offline)
    except Exception as exc:  # the hub raises many kinds; all mean "cannot get it"
        raise unavailable(ref, exc, offline) from None
    return Path(path)


def unavailable(ref: str, exc: BaseException, offline: bool = False) -> CheckpointError:
    """The one line for a hub id the hub (or the offline cache) cannot give."""
    mode = "offline (HF_HUB_OFFLINE is set) and not in the cache" if offline else \
        "could not be found or downloaded"
    return CheckpointError(f"model {quote(ref)}: not a local directory, and as a hub id it "
                           f"{mode}: {type(exc).__name__}: {str(exc)[:300]}")


def _kind(path: Path, ref: str) -> str:
    """"dir", "missing" or "other" (a file, a FIFO...); one line for a path the OS refuses to
    look at (too long, no permission)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise CheckpointError(f"model {quote(ref)}: {quote(str(path))} is a symlink to "
                                  f"{quote(os.readlink(path))}, which does not exist") from None
        return "missing"
    except OSError as exc:
        raise CheckpointError(f"model {quote(ref)}: cannot look at {quote(str(path))} "
                              f"({exc.strerror})") from None
    return "dir" if stat.S_ISDIR(st.st_mode) else "other"
