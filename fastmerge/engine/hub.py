"""Model references: a local directory, or a Hugging Face hub id ``org/name[@revision]``
resolved through huggingface_hub's cache (downloads only the files a merge reads; honours
HF_HUB_OFFLINE / HF_HUB_CACHE like every other HF tool)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .checkpoint_io import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# what a merge reads from a hub repo: weights, index, config, tokenizer, generation config
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt",
                  "vocab.txt", "*.jinja", "*.txt"]


def split_reference(ref: str) -> tuple[str, Optional[str]]:
    """'org/name@rev' -> ('org/name', 'rev'); a path -> (path, None)."""
    if "@" in ref and not os.path.exists(ref):
        name, rev = ref.rsplit("@", 1)
        return name, (rev or None)
    return ref, None


def resolve_model(ref, config_dir: Optional[Path] = None) -> Path:
    """The local directory holding model ``ref`` (downloading it to the HF cache if needed)."""
    if not isinstance(ref, str) or not ref.strip():
        raise CheckpointError(f"a model reference must be a path or hub id, got {ref!r}")
    if "+" in ref and not os.path.exists(ref):
        raise CheckpointError(f"model {ref!r}: mergekit's 'model+lora' references are not "
                              f"supported; merge the LoRA into the model first")
    p = Path(os.path.expanduser(ref))
    candidates = [p] if p.is_absolute() else [p] + ([config_dir / p] if config_dir else [])
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    name, rev = split_reference(ref)
    looks_local = ref.startswith((".", "/", "~")) or not HUB_ID.match(name)
    if looks_local:
        raise CheckpointError(f"model {ref!r}: no such directory (and not a hub id org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise CheckpointError(f"model {ref!r}: not a local directory and huggingface_hub is "
                              f"not installed") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        path = snapshot_download(repo_id=name, revision=rev, allow_patterns=ALLOW_PATTERNS,
                                 local_files_only=offline)
    except Exception as exc:  # the hub raises many kinds; all mean "cannot get it"
        mode = "offline (HF_HUB_OFFLINE is set) and not in the cache" if offline else \
            "could not be found or downloaded"
        raise CheckpointError(f"model {ref!r}: not a local directory, and as a hub id it "
                              f"{mode}: {type(exc).__name__}: {exc}") from None
    return Path(path)
