"""What a checkpoint merge reports: the result and its summary line, peak RSS, progress bars,
the default memory budget, and the resolved parameters; torch-free (engine/native.py uses it
too)."""
from __future__ import annotations

import dataclasses
import json
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .._version import __version__
from ..lines import count_blocks, depth_function, lines_factor
from .model_card import model_card
from .writer import copy_model_files, write_index

DEFAULT_BUDGET = 8 * 2 ** 30


@dataclass
class MergeResult:
    output_dir: Path
    method: str
    backend: str
    device: str
    tensors: int
    shards: int
    bytes_in: int
    bytes_out: int
    seconds: float
    peak_rss: int
    peak_gpu: Optional[int]
    chunk_elems: int
    passes: list = field(default_factory=list)
    resolved: dict = field(default_factory=dict)

    def summary(self) -> str:
        gpu = f", peak GPU memory {self.peak_gpu / 2 ** 30:.2f} GiB" if self.peak_gpu else ""
        return (f"fastmerge: {self.method} merged {self.tensors} tensors "
                f"({self.bytes_in / 1e9:.2f} GB read, {self.bytes_out / 1e9:.2f} GB written, "
                f"{self.shards} shard{'s' if self.shards != 1 else ''}) in {self.seconds:.1f} s "
                f"({self.bytes_in / max(self.seconds, 1e-9) / 1e9:.2f} GB/s) on backend "
                f"{self.backend} ({self.device}); peak RSS {self.peak_rss / 2 ** 30:.2f} GiB"
                f"{gpu} -> {self.output_dir}")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_budget() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return min(DEFAULT_BUDGET, total // 2)
    except (ValueError, OSError):  # pragma: no cover
        return DEFAULT_BUDGET


class NullBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass

    def close(self):
        pass


def progress_factory(quiet: bool):
    def make(desc: str, total: int):
        if quiet:
            return NullBar()
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                    dynamic_ncols=True, leave=True)
    return make


def resolved_parameters(specs: dict) -> tuple[list, dict]:
    """Distinct resolved specs (as dicts) and, where they differ, tensor -> index."""
    distinct, index = [], {}
    keys = {}
    for name, spec in specs.items():
        d = spec.to_dict()
        k = json.dumps(d, sort_keys=True, default=str)
        if k not in keys:
            keys[k] = len(distinct)
            distinct.append(d)
        index[name] = keys[k]
    return distinct, (index if len(distinct) > 1 else {})


def apply_lines(cfg, order: list, merged: list, base_specs: dict, alpha) -> tuple[dict, dict]:
    """The specs with each tensor's LiNeS factor (alpha: a number, alpha_auto already
    resolved) and what the metadata records of it; the specs as they are without LiNeS."""
    specs = dict(base_specs)
    if cfg.lines is None:
        return specs, {}
    lc = cfg.lines
    depth = depth_function(order, lc.outside, lc.pattern)
    num_blocks = count_blocks(order, lc.pattern)
    for x in merged:
        specs[x] = dataclasses.replace(
            base_specs[x], lines_factor=lines_factor(depth(x), num_blocks, alpha, lc.beta))
    return specs, dict(alpha=alpha, alpha_as_written=lc.alpha, beta=lc.beta, outside=lc.outside,
                       pattern=lc.pattern, num_blocks=num_blocks)


def describe(cfg, inputs, backend: str, device: str, specs: dict, extra: dict
             ) -> tuple[dict, dict, str, dict]:
    """(resolved parameters, tensor -> parameter index where they differ, the config as YAML,
    the safetensors metadata) of a merge; ``extra``: model-wide thresholds, LiNeS."""
    import yaml
    distinct, per_tensor = resolved_parameters(specs)
    resolved = {
        "method": cfg.method, "merge_method_as_written": cfg.method_as_written,
        "defaults": "mergekit" if cfg.uses_mergekit_defaults else "fastmerge",
        "scope": cfg.scope, "base_model": cfg.base_model,
        "models": [m.ref for m in cfg.models], "backend": backend, "device": device,
        "out_dtype": cfg.output_dtype if cfg.output_dtype else "per tensor: the base's",
        "parameters": distinct, **extra, "copied_unmerged_tensors": inputs.copied,
    }
    config_text = yaml.safe_dump(cfg.raw, sort_keys=False)
    st_meta = {"format": "pt", "fastmerge_version": __version__, "merge_method": cfg.method,
               "merge_config": config_text, "fastmerge_resolved": json.dumps(resolved)}
    return resolved, per_tensor, config_text, st_meta


def write_extras(directory: Path, layout, cfg, inputs, resolved: dict, per_tensor: dict,
                 config_text: str) -> None:
    """The index, config.json and tokenizer files of the base, the model card and the config
    beside the shards."""
    write_index(layout, directory, {"fastmerge_version": __version__, "merge_config": cfg.raw,
                                    "resolved": resolved, "tensor_parameters": per_tensor})
    copied_files = copy_model_files(inputs.reference.dir, directory, cfg.output_dtype)
    (directory / "README.md").write_text(model_card(cfg, resolved, config_text, copied_files))
    with open(directory / "fastmerge_config.yml", "w") as f:
        f.write(config_text)
