"""The inputs of a merge, ``slices:`` included: every model a sliced config names opened once,
recipe/slices.py's jobs turned into routes (output tensor -> the input tensors it reads) and
checked like a 'models:' merge; the tokenizer source of either form; torch-free."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ..checkpoint.hub import cached_snapshot, hub_offline, hub_reference
from ..checkpoint.safetensors_file import (
    MERGEABLE_ST,
    NAME_TO_ST,
    Checkpoint,
    CheckpointError,
    dtype_label,
)
from ..checkpoint.sources import (
    headers_only_active,
    hub_headers_only,
    local_paths,
    model_directory,
    open_model,
    split_lora_reference,
)
from ..recipe.config import ConfigError, MergeConfig
from ..recipe.slices import ModelLayout, plan_slices
from .inputs import Inputs, open_inputs
from .vocabulary import vocabulary_for


class RoutedCheckpoint:
    """Output tensor names read from (checkpoint, input tensor name): the reference of a sliced
    merge (shapes, dtypes, the copied tensors), with a model's directory for config.json."""

    def __init__(self, table: dict, directory: Path, label: str):
        self.table, self.dir, self.label = table, Path(directory), label

    @property
    def names(self) -> list:
        return list(self.table)

    def info(self, name):
        c, n = self.table[name]
        return c.info(n)

    def view(self, name, start=0, stop=None):
        c, n = self.table[name]
        return c.view(n, start, stop)

    def map(self, name, start=0, stop=None):
        c, n = self.table[name]
        return c.map(n, start, stop)

    def read(self, name, start=0, stop=None, out=None):
        c, n = self.table[name]
        return c.read(n, start, stop, out=out)

    def path_of(self, name):
        c, n = self.table[name]
        return c.path_of(n)

    def close(self):
        pass


def open_merge_inputs(cfg: MergeConfig, needs_moments: bool, precheck=None) -> Inputs:
    """open_inputs, or the sliced inputs for a ``slices:`` config; with the tokenizer source
    found (before any work: a missing one is an error now, not after the merge).
    ``precheck(inputs)``: where a hub model must be downloaded, the inputs are first opened
    by ``open_headers_only`` and ``precheck`` (the pipeline's resolve) runs on them: a config
    or input error comes before any weight is downloaded. A ``.bin``-only hub repo cannot be
    checked so: then the merge goes on as without ``precheck``."""
    if precheck is not None and hub_downloads(cfg):
        view = open_headers_only(cfg, needs_moments)
        if view is not None:
            try:
                precheck(view)
            finally:
                close_inputs(view)
    return _open_merge_inputs(cfg, needs_moments)


def open_headers_only(cfg: MergeConfig, needs_moments: bool,
                      unchecked: Optional[str] = None) -> Optional[Inputs]:
    """The inputs of ``cfg`` with every uncached hub model opened from its config.json,
    indexes and safetensors headers (hub_headers_only: no weight downloaded), or None where a
    hub model cannot be opened so (a ``.bin``-only repo; with ``unchecked``, that model's
    error instead, with this said after it). The pre-checks of a merge and of a sweep, and
    the dry run, open their inputs here."""
    with hub_headers_only(TOKENIZER_FILES if cfg.tokenizer_source is not None else ()) \
            as state:
        try:
            return _open_merge_inputs(cfg, needs_moments)
        except CheckpointError as exc:
            if not state.unchecked:
                raise
            if unchecked is not None:
                raise CheckpointError(f"{exc}; {unchecked}") from None
            return None


# the files besides config.json a vocabulary step reads from a hub model's snapshot
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt")


def input_refs(cfg: MergeConfig) -> list:
    """Every model reference of a config (both sides of 'base+adapter'): base, models, slice
    sources, the tokenizer's model."""
    refs = [cfg.base_model, *(m.ref for m in cfg.models),
            *(s.model for sl in (cfg.slices or []) for s in sl.sources), cfg.tokenizer_model]
    return [part for r in refs if r is not None for part in local_paths(r, cfg.base_dir)]


def hub_downloads(cfg: MergeConfig) -> bool:
    """Whether opening the config's inputs downloads a hub model (online, not cached, not
    within hub_headers_only already)."""
    if hub_offline() or headers_only_active():
        return False
    for ref in input_refs(cfg):
        try:
            local, hub = hub_reference(ref, cfg.base_dir)
        except CheckpointError:
            continue   # opening it says what is wrong
        if hub is not None and cached_snapshot(*hub) is None:
            return True
    return False


def _open_merge_inputs(cfg: MergeConfig, needs_moments: bool) -> Inputs:
    tok_dir = tokenizer_dir(cfg, None)
    vocab = vocabulary_for(cfg, tok_dir)
    try:
        inputs = open_sliced(cfg) if cfg.slices is not None else \
            open_inputs(cfg, needs_moments, vocab.adapt if vocab is not None else None)
    except BaseException:
        if vocab is not None:
            vocab.cleanup()
        raise
    inputs.vocabulary = vocab
    inputs.tokenizer_dir = vocab.tokenizer_dir if vocab is not None and \
        vocab.tokenizer_dir is not None else tok_dir
    return inputs


def close_inputs(inputs: Inputs) -> None:
    for c in [inputs.base, *inputs.models, *inputs.preconditioners]:
        if c is not None:
            c.close()
    if inputs.vocabulary is not None:
        inputs.vocabulary.cleanup()


def tokenizer_dir(cfg: MergeConfig, inputs: Inputs) -> Optional[Path]:
    """Where the tokenizer files are copied from: None for the reference model's (the
    default), the base for "base", the named model for "model:<ref>"."""
    ref = cfg.tokenizer_model
    if ref is None and cfg.tokenizer_source == "base" and cfg.base_model is not None:
        ref = cfg.base_model
    if ref is None:
        return None
    key = "tokenizer_source" if "tokenizer_source" in cfg.raw else "tokenizer.source"
    try:
        found = Path(model_directory(ref, cfg.base_dir))
    except CheckpointError as exc:
        raise CheckpointError(f"{key}: {exc}") from None
    if cfg.tokenizer_model is not None and not _in_merge(cfg, ref, found):
        raise ConfigError(f"{key}: model {ref!r} is not one of the merge's models; name the "
                          f"base_model or one of the models")
    return found


def _in_merge(cfg: MergeConfig, ref: str, found: Path) -> bool:
    """Whether ``ref`` (resolved to ``found``) is the base or a model of the merge."""
    refs = [cfg.base_model, *(m.ref for m in cfg.models),
            *(s.model for sl in (cfg.slices or []) for s in sl.sources)]
    for r in refs:
        if r is None:
            continue
        if r == ref:
            return True
        try:
            if Path(model_directory(split_lora_reference(r, cfg.base_dir)[0],
                                    cfg.base_dir)).resolve() == found.resolve():
                return True
        except CheckpointError:
            continue
    return False


def _read_config(c: Checkpoint, where: str) -> dict:
    p = c.dir / "config.json"
    if not p.is_file():
        return {}
    try:
        got = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: {p} is not readable JSON ({exc})") from None
    return got if isinstance(got, dict) else {}


def open_sliced(cfg: MergeConfig) -> Inputs:
    opened: dict = {}
    try:
        return _open_sliced(cfg, opened)
    except BaseException:
        for c in opened.values():
            c.close()
        raise


def _open_sliced(cfg: MergeConfig, opened: dict) -> Inputs:
    layouts = {}
    for i, sl in enumerate(cfg.slices):
        for j, s in enumerate(sl.sources):
            if s.model in opened:
                continue
            where = f"slices[{i}].sources[{j}].model"
            try:
                c = open_model(s.model, cfg.base_dir)
            except CheckpointError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
            opened[s.model] = c
            layouts[s.model] = ModelLayout(c.names, _read_config(c, where))
    if cfg.base_model is not None and cfg.base_model not in opened:
        try:   # only its config.json: the output's is made from the base's (as mergekit does)
            c = open_model(cfg.base_model, cfg.base_dir)
        except CheckpointError as exc:
            raise CheckpointError(f"base_model: {exc}") from None
        opened[cfg.base_model] = c
        layouts[cfg.base_model] = ModelLayout([], _read_config(c, "base_model"))
    return _routed(cfg, opened, layouts)


def reroute(inputs: Inputs, cfg: MergeConfig) -> Inputs:
    """The inputs of ``cfg`` (the same slices as the config ``inputs`` were opened for, other
    parameters or method) over the checkpoints ``inputs`` opened: its own plan and routes; a
    sweep's points share one read where these routes are the same (``same_routes``)."""
    got = _routed(cfg, inputs.plan.opened, inputs.plan.layouts)
    return dataclasses.replace(got, vocabulary=inputs.vocabulary,
                               tokenizer_dir=inputs.tokenizer_dir)


def same_routes(a: Inputs, b: Inputs) -> bool:
    """Whether two sliced Inputs read the same input tensors for the same outputs."""
    def key(x: Inputs):
        return x.order, x.merged, x.copied, {
            n: (None if bs is None else (id(bs[0]), bs[1]), [(id(c), t) for c, t in ms])
            for n, (bs, ms) in x.routes.items()}
    return key(a) == key(b)


def _routed(cfg: MergeConfig, opened: dict, layouts: dict) -> Inputs:
    plan = plan_slices(cfg, layouts)
    plan.opened, plan.layouts = opened, layouts
    out_st = NAME_TO_ST.get(cfg.output_dtype) if cfg.output_dtype else None
    routes, ref_table, merged, copied = {}, {}, [], []
    for job in plan.jobs:
        base = (opened[job.base[0]], job.base[1]) if job.base is not None else None
        models = [(opened[m], n) for m, n in job.models]
        ref = base if base is not None else models[0]
        routes[job.name] = (base, models)
        ref_table[job.name] = ref
        ri = ref[0].info(ref[1])
        float_ref = ri.st in MERGEABLE_ST
        for c, n in ([base] if base is not None else []) + models:
            ci = c.info(n)
            if ci.shape != ri.shape:
                raise CheckpointError(f"output tensor {job.name!r}: shape {list(ci.shape)} of "
                                      f"{n!r} in {c.path_of(n)} but {list(ri.shape)} of "
                                      f"{ref[1]!r} in {ref[0].path_of(ref[1])}")
            if float_ref and ci.st not in MERGEABLE_ST or not float_ref and ci.st != ri.st:
                raise CheckpointError(f"output tensor {job.name!r}: dtype {dtype_label(ci.st)} "
                                      f"of {n!r} in {c.path_of(n)} does not match "
                                      f"{dtype_label(ri.st)} of {ref[1]!r} in "
                                      f"{ref[0].path_of(ref[1])}")
        if job.copy and float_ref and out_st is not None and ri.st != out_st:
            job.copy, job.scale = False, 1.0   # another dtype: rounded, not copied
        (merged if float_ref and not job.copy else copied).append(job.name)
    if len(routes) != len(plan.jobs):
        dup = next(j.name for k, j in enumerate(plan.jobs)
                   if j.name in {x.name for x in plan.jobs[:k]})
        raise ConfigError(f"slices: two output tensors are both named {dup!r}")
    config_dir = opened[plan.config_model].dir
    reference = RoutedCheckpoint(ref_table, config_dir, "slices")
    return Inputs(None, list(opened.values()), [], reference, merged, copied,
                  [j.name for j in plan.jobs], {}, routes=routes, plan=plan)
