"""The inputs of a checkpoint merge, opened and checked against each other (names, shapes,
dtypes, second-moment files) before any work; torch-free (pipeline/native.py uses it too)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..checkpoint.embeddings import reconcile_tied_heads, vocab_hint
from ..checkpoint.safetensors_file import (
    MERGEABLE_ST,
    Checkpoint,
    CheckpointError,
    SafetensorsFile,
    dtype_label,
)
from ..checkpoint.sources import local_paths, open_model
from ..output.writer import output_dir_at_start, parse_size
from ..recipe.config import ConfigError, MergeConfig

MOMENT_SUFFIX = ".exp_avg_sq"


def merge_settings(cfg: MergeConfig, out_dir, overwrite: bool, memory_budget, shard_size,
                   lines_pattern: Optional[str], default_budget: int):
    """The checks and sizes every merge starts with: (out_dir, budget bytes, shard bytes);
    applies ``lines_pattern``. Before any work: an existing ``out_dir`` without ``overwrite``
    and an ``out_dir`` that is, holds or lies in an input are errors, and ``out_dir`` records
    what it was now (an ``OutputDir``: --overwrite replaces only that directory)."""
    if lines_pattern is not None and cfg.lines is not None:
        cfg.lines.pattern = lines_pattern
    out_dir = output_dir_at_start(out_dir)
    check_output_apart_from_inputs(cfg, out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; pass --overwrite "
                              f"(overwrite=True) to replace it")
    budget = parse_size(memory_budget, "memory budget") if memory_budget is not None \
        else default_budget
    return out_dir, budget, parse_size(shard_size, "shard size")


def input_paths(cfg: MergeConfig) -> list:
    """(what, local path) of every input the config names that exists here: base and models
    (hub ids live in the hub cache and are not listed), second-moment files."""
    found = []

    def add(what, ref):
        for part in local_paths(ref, cfg.base_dir):   # both sides of 'base+adapter'
            p = Path(os.path.expanduser(str(part)))
            candidates = [p] if p.is_absolute() or cfg.base_dir is None else \
                [p, cfg.base_dir / p]
            found.extend((what, c) for c in candidates if c.exists())
    if cfg.base_model:
        add("base_model", cfg.base_model)
    for i, m in enumerate(cfg.models):
        add(f"models[{i}]", m.ref)
        if m.preconditioner_path:
            add(f"models[{i}].preconditioner_path", m.preconditioner_path)
    return found


def check_output_apart_from_inputs(cfg: MergeConfig, out_dir) -> None:
    """An OUT_DIR that is, contains or lies inside an input (or contains the config file's
    directory) is an error: --overwrite would delete that input."""
    out = os.path.realpath(out_dir)

    def inside(a, b):   # a is b or lies under b
        return a == b or os.path.commonpath([a, b]) == b
    for what, path in input_paths(cfg):
        p = os.path.realpath(path)
        how = "is" if out == p else "lies inside" if inside(out, p) else \
            "contains" if inside(p, out) else None
        if how:
            raise ConfigError(f"output directory {out_dir} {how} input {what} ({path}); "
                              f"choose an OUT_DIR apart from every input")
    if cfg.base_dir is not None and inside(os.path.realpath(cfg.base_dir), out):
        raise ConfigError(f"output directory {out_dir} contains the config file's directory "
                          f"{cfg.base_dir}; choose an OUT_DIR apart from every input")


@dataclass
class Inputs:
    base: Optional[Checkpoint]
    models: list
    preconditioners: list          # SafetensorsFile per model (curvature methods) or []
    reference: Checkpoint          # where names, shapes and copied files come from
    merged: list                   # names of the tensors merged
    copied: list                   # non-float tensors copied from the reference
    order: list                    # all names, output order
    moment_names: dict             # tensor name -> [name in each preconditioner file]
    # slices (pipeline/sliced.py): output tensor -> (base (checkpoint, input tensor) or None,
    # [(checkpoint, input tensor)]), recipe.slices.SlicePlan
    routes: Optional[dict] = None
    plan: Any = None
    tokenizer_dir: Optional[Path] = None   # tokenizer files from here (None: the reference's)
    config_overrides: Optional[dict] = None  # keys set in the output config.json (tied heads)
    vocabulary: Any = None                 # pipeline/vocabulary.Vocabulary (tokenizer_source)

    def sources(self, name: str) -> tuple:
        """(base (checkpoint, tensor) or None, [(checkpoint, tensor)]) that output ``name``
        reads: the same name in every input, or a slice job's route."""
        if self.routes is not None:
            return self.routes[name]
        return ((self.base, name) if self.base is not None else None,
                [(m, name) for m in self.models])

    def in_bytes(self, name: str) -> int:
        """Bytes of tensor ``name`` in the base and the models (what a merge of it reads)."""
        base, models = self.sources(name)
        return sum(c.info(n).nbytes for c, n in ([base] if base is not None else []) + models)


def open_inputs(cfg: MergeConfig, needs_moments: bool, adapt=None) -> Inputs:
    """``adapt(sources, has_base) -> (sources, config keys)``: applied to the opened sources
    before they are checked against each other (pipeline/vocabulary.py re-orders rows)."""
    def open_ckpt(ref, what):
        try:
            return open_model(ref, cfg.base_dir)
        except CheckpointError as exc:
            raise CheckpointError(f"{what}: {exc}") from None
    base = open_ckpt(cfg.base_model, "base_model") if cfg.needs_base else None
    models = [open_ckpt(m.ref, f"models[{i}]") for i, m in enumerate(cfg.models)]
    srcs, overrides = reconcile_tied_heads([x for x in [base, *models] if x is not None])
    if adapt is not None:
        srcs, more = adapt(srcs, base is not None)
        overrides = {**overrides, **more}
    base, models = (srcs[0], srcs[1:]) if base is not None else (None, srcs)
    ref = base if base is not None else models[0]
    names = ref.names
    others = [("model", i, m) for i, m in enumerate(models)]
    merged, copied = [], []
    ref_set = set(names)
    for _, i, m in others:
        if m is ref:
            continue
        missing = [n for n in names if n not in m.where]
        if missing:
            raise CheckpointError(f"model {m.label!r} ({m.dir}) lacks tensor {missing[0]!r} "
                                  f"(held by {ref.path_of(missing[0])})"
                                  + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        extra = [n for n in m.names if n not in ref_set]
        if extra:
            raise CheckpointError(f"{m.path_of(extra[0])}: tensor {extra[0]!r} is not in the "
                                  f"{'base' if base is not None else 'first'} model "
                                  f"{ref.label!r}"
                                  + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""))
    for n in names:
        ri = ref.info(n)
        float_ref = ri.st in MERGEABLE_ST
        for _, i, m in others:
            if m is ref:
                continue
            mi = m.info(n)
            if mi.shape != ri.shape:
                hint = vocab_hint(n, mi.shape, ri.shape)
                raise CheckpointError(f"tensor {n!r}: shape {list(mi.shape)} in "
                                      f"{m.path_of(n)} but {list(ri.shape)} in {ref.path_of(n)}"
                                      + (f": {hint}" if hint else ""))
            if float_ref and mi.st not in MERGEABLE_ST or not float_ref and mi.st != ri.st:
                raise CheckpointError(f"tensor {n!r}: dtype {dtype_label(mi.st)} in {m.path_of(n)} "
                                      f"does not match {dtype_label(ri.st)} in {ref.path_of(n)}")
        (merged if float_ref else copied).append(n)
    pre, moment_names = [], {}
    if needs_moments:
        for i, m in enumerate(cfg.models):
            if not m.preconditioner_path:
                raise ConfigError(f"merge_method {cfg.method!r} needs each model's second "
                                  f"moments: set models[{i}].preconditioner_path")
            p = Path(os.path.expanduser(m.preconditioner_path))
            if not p.is_absolute() and cfg.base_dir is not None and not p.exists():
                p = cfg.base_dir / p
            if not p.exists():
                raise CheckpointError(f"models[{i}].preconditioner_path: {p} does not exist")
            pre.append(Checkpoint(p, label=str(p)) if p.is_dir() else SafetensorsFile(p))
        for n in merged:
            row = []
            for i, pf in enumerate(pre):
                store = pf.where if isinstance(pf, Checkpoint) else pf.tensors
                label = pf.dir if isinstance(pf, Checkpoint) else pf.path
                mn = n if n in store else n + MOMENT_SUFFIX
                if mn not in store:
                    raise CheckpointError(f"{label}: no second moments for tensor {n!r} "
                                          f"(looked for {n!r} and {n + MOMENT_SUFFIX!r})")
                vi = pf.info(mn)
                if vi.shape != ref.info(n).shape:
                    raise CheckpointError(f"{label}, tensor {mn!r}: second moments have shape "
                                          f"{list(vi.shape)}, the weights "
                                          f"{list(ref.info(n).shape)}")
                if vi.st not in MERGEABLE_ST:
                    raise CheckpointError(f"{label}, tensor {mn!r}: second moments must be "
                                          f"bf16/fp16/fp32, got {dtype_label(vi.st)}")
                row.append(mn)
            moment_names[n] = row
    return Inputs(base, models, pre, ref, merged, copied, names, moment_names,
                  config_overrides=overrides)


MODEL_INDEX = re.compile(r"model (\d+)")


def name_files(exc: ValueError, inputs: Inputs, name: str) -> CheckpointError:
    """Add the file of the offending model to a NaN/Inf error from the kernels."""
    msg = str(exc)
    m = MODEL_INDEX.search(msg)
    files = []
    base, models = inputs.sources(name)
    if m and int(m.group(1)) < len(models):
        files.append(str(models[int(m.group(1))][0].path_of(models[int(m.group(1))][1])))
    if base is not None:
        files.append(f"base {base[0].path_of(base[1])}")
    return CheckpointError(f"{msg} [files: {', '.join(files)}]")
