"""What a checkpoint merge reports: the result and its summary line, peak RSS, progress bars,
the default memory budget, and the resolved parameters; torch-free (pipeline/native.py uses it
too)."""
from __future__ import annotations

import dataclasses
import json
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import abi
from .._version import __version__
from ..methods.lines import block_depth, count_blocks, lines_factor, stack_sizes
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
    nonfinite: dict = field(default_factory=dict)   # tensor -> NaN/Inf count (allow_nonfinite)

    def summary(self) -> str:
        gpu = f", peak GPU memory {self.peak_gpu / 2 ** 30:.2f} GiB" if self.peak_gpu else ""
        return (f"fastmerge: {self.method} merged {self.tensors} tensors "
                f"({self.bytes_in / 1e9:.2f} GB read, {self.bytes_out / 1e9:.2f} GB written, "
                f"{self.shards} shard{'s' if self.shards != 1 else ''}) in {self.seconds:.1f} s "
                f"({self.bytes_in / max(self.seconds, 1e-9) / 1e9:.2f} GB/s) on backend "
                f"{self.backend} ({self.device}); peak RSS {self.peak_rss / 2 ** 30:.2f} GiB"
                f"{gpu} -> {self.output_dir}")


class NonFiniteOutput(ValueError):
    """A merged tensor came out with NaN/Inf values from finite inputs (an overflow of the
    output dtype); the merge stops and writes nothing unless allow_nonfinite."""


class NonFiniteOutputWarning(UserWarning):
    """allow_nonfinite: merged tensors with NaN/Inf values were written."""


# (bits per element, the exponent bits): a value is NaN or Inf iff its exponent bits are all set
_NONFINITE_BITS = {"BF16": (16, 0x7F80), "F16": (16, 0x7C00), "F32": (32, 0x7F800000)}
_ST_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


_DTYPE_CODES = {"F32": abi.DTYPE_FLOAT32, "F16": abi.DTYPE_FLOAT16, "BF16": abi.DTYPE_BFLOAT16}


def _core():
    try:
        from .. import _core
    except ImportError:
        return None
    return _core if hasattr(_core, "count_nonfinite") else None


def nonfinite_in(data, st: str):
    """(count, first index) of the NaN/Inf elements of a chunk's raw bytes of safetensors
    dtype ``st``, or None when all are finite. Two max-reductions over the bits, no temporary:
    positive NaN/Inf are the largest values read as signed integers, negative ones the largest
    read as unsigned; the positions are looked for only when there are some. Where the CPU
    kernels are built, their one vectorised pass does it (no numpy import on the CLI's path)."""
    core = _core()
    if core is not None:
        count, first = core.count_nonfinite(data, _DTYPE_CODES[st])
        return None if count == 0 else (count, first)
    import numpy as np
    width, exponent = _NONFINITE_BITS[st]
    signed = np.frombuffer(data, dtype=np.int16 if width == 16 else np.int32)
    if not signed.size:
        return None
    unsigned = signed.view(np.uint16 if width == 16 else np.uint32)
    sign = 1 << (width - 1)
    if int(signed.max()) < exponent and int(unsigned.max()) < (sign | exponent):
        return None
    bad = np.flatnonzero((unsigned & (sign - 1)) >= exponent)
    return len(bad), int(bad[0])


class NonFiniteCheck:
    """The check of every merged output chunk: an error naming the tensor (nothing is written:
    the caller's atomic output directory is removed), or with ``allow`` a record of the
    tensors and one warning naming them at the end."""

    def __init__(self, allow: bool = False):
        self.allow = allow
        self.found: dict = {}

    def found_in(self, name: str, start: int, stop: int, numel: int, st: str, got) -> None:
        """``got``: nonfinite_in's answer for elements [start, stop) of tensor ``name``."""
        if got is None:
            return
        count, first = got
        if self.allow:
            self.found[name] = self.found.get(name, 0) + count
            return
        where = "" if (start, stop) == (0, numel) else f" among elements [{start}, {stop})"
        raise NonFiniteOutput(
            f"tensor {name!r}: the merged output has {count} NaN/Inf value(s){where}, the first "
            f"at element {start + first}, though the inputs are finite: the merge overflowed "
            f"{_ST_NAMES[st]} (large weights or lambda?); nothing was written ("
            f"{'use a wider out_dtype, or ' if st != 'F32' else ''}--allow-nonfinite / "
            f"allow_nonfinite=True writes it anyway)")

    def warn(self) -> None:
        if self.found:
            import warnings
            names = ", ".join(f"{n!r} ({c})" for n, c in list(self.found.items())[:5])
            more = f" and {len(self.found) - 5} more" if len(self.found) > 5 else ""
            warnings.warn(NonFiniteOutputWarning(
                f"wrote {len(self.found)} merged tensor(s) with NaN/Inf values "
                f"(allow_nonfinite): {names}{more}"), stacklevel=3)


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
    depth = block_depth(order, lc.outside, lc.pattern)   # (depth, D) in its own stack
    num_blocks = count_blocks(order, lc.pattern)
    for x in merged:
        d, n = depth(x) or (None, num_blocks)
        specs[x] = dataclasses.replace(
            base_specs[x], lines_factor=lines_factor(d, n, alpha, lc.beta))
    return specs, dict(alpha=alpha, alpha_as_written=lc.alpha, beta=lc.beta, outside=lc.outside,
                       pattern=lc.pattern, num_blocks=num_blocks,
                       stacks=stack_sizes(order, lc.pattern))


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
    updates = {**(inputs.plan.config_updates if inputs.plan is not None else {}),
               **(inputs.config_overrides or {})}
    copied_files = copy_model_files(inputs.reference.dir, directory, cfg.output_dtype,
                                    tokenizer_src=inputs.tokenizer_dir,
                                    config_updates=updates or None)
    (directory / "README.md").write_text(model_card(cfg, resolved, config_text, copied_files))
    with open(directory / "fastmerge_config.yml", "w") as f:
        f.write(config_text)
