"""``fastmerge merge --dry-run``: everything a merge resolves before it reads a weight, shown.

The pipeline's own ``resolve`` runs (settings, every input's config, index and safetensors
headers opened and checked against each other, every tensor's parameters, the chunk size), on
the kernels the merge would take, and the plan is printed: each output tensor with its dtype,
parameter set and read passes, the passes over the whole model, the bytes read and written,
and the memory the merge needs. No weight is read (headers only) and nothing is written.

A hub model in the local Hugging Face cache is read from there; one not cached is checked
from its config.json, index and safetensors headers alone (checkpoint/hub_headers.py: HTTP
range requests, no weight downloaded). A ``.bin``-only hub repo not cached cannot be shown
(pickles have no separate header): the dry run says so. Offline (HF_HUB_OFFLINE) an uncached
hub model fails, as in a merge.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..checkpoint.safetensors_file import ST_SIZES
from ..methods.kernel_params import needs_l1
from ..output.report import apply_lines, resolved_parameters
from ..planning.planner import SELECTING
from ..recipe.config import MergeConfig, load_config
from .budget import element_ranges
from .driver import Resolved, read_whole_for_topk, resolved_merge
from .sliced import open_headers_only

# said after the error of an uncached hub model that cannot be opened from its headers
_CANNOT_SHOW = ("it is not in the local cache, so the dry run cannot show it (a merge "
                "downloads it, then checks it)")


def dry_run(config, out_dir, make_kernels: Callable, *, memory_budget=None, shard_size="5GB",
            seed: Optional[int] = None, overwrite: bool = False,
            lines_pattern: Optional[str] = None, max_chunk_elems: Optional[int] = None,
            local_world_size: int = 1) -> str:
    """The plan of ``pipeline.merge`` with the same arguments, as text; reads no weight."""
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    with resolved_merge(cfg, out_dir, make_kernels, memory_budget=memory_budget,
                        shard_size=shard_size, seed=seed, overwrite=overwrite,
                        lines_pattern=lines_pattern, max_chunk_elems=max_chunk_elems,
                        local_world_size=local_world_size,
                        open_headers=lambda c, moments: open_headers_only(
                            c, moments, unchecked=_CANNOT_SHOW)) as (r, k, budget):
        return describe_plan(r, k, budget)


def _read_passes(r: Resolved, k, name: str, spec) -> list[str]:
    """The read passes one tensor's plan makes before its merge pass."""
    out = []
    one_chunk = len(element_ranges(r.inputs.reference.info(name).shape,
                                   r.chunking.chunk_elems)) == 1
    if spec.sparsifier in SELECTING and not r.model_scope:
        # the CPU kernels guess a chunked tensor's level-1 bins from its first chunk
        # (planning/radix.py radix_select_one_read); ranks sum their histograms: two reads
        guess = spec.score != "fisher" and k.chunking_name == "cpu"
        # a tensor of two chunks is read whole for the window where the merge does so
        # (driver.read_whole_for_topk; not with rescale: l1, nor in alpha=auto's own pass)
        window = one_chunk or (spec.rescale != "l1" and not r.alpha_auto and
                               read_whole_for_topk(r, k, name))
        out.append("top-k window (radix on a miss)" if window and guess else
                   "radix selection x1 (x2 on a missed guess)" if guess and name not in r.rows
                   else "radix selection x2")
        if spec.rescale == "l1":
            return out
    if needs_l1(spec) or (spec.combine == "ota" and spec.ota_normalize == "global"):
        out.append("statistics")
    return out


def _same_model(c) -> tuple:
    """One key per model whatever its spelling in the config (``./a``, ``a/``): its directory,
    and a LoRA adapter's."""
    adapter = getattr(c, "adapter_dir", None)
    return (str(Path(c.dir).resolve()), None if adapter is None else
            str(Path(adapter).resolve()))


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


class _SliceInputs:
    """A 'slices:' merge's inputs as a user counts them: the distinct models its slices read
    (the base apart, as for 'models:'), each with a short label for the per-tensor sources."""

    def __init__(self, cfg, inputs):
        opened = inputs.plan.opened            # spelling in the config -> opened checkpoint
        base = opened.get(cfg.base_model) if cfg.base_model is not None else None
        self.base_key = _same_model(base) if base is not None else None
        self.keys, spellings = {}, {}         # id(checkpoint) -> model key; key -> spellings
        for spelling, c in opened.items():
            self.keys[id(c)] = _same_model(c)
            spellings.setdefault(_same_model(c), []).append(spelling)
        read = {self.keys[id(c)] for bs, ms in inputs.routes.values()
                for c, _ in ([bs] if bs is not None else []) + ms}
        self.labels = {self.base_key: "base"} if self.base_key is not None else {}
        legend = []
        for key, names in spellings.items():
            if key == self.base_key:   # as base_model spells it
                names = [cfg.base_model] + [x for x in names if x != cfg.base_model]
            also = f" (also written {', '.join(names[1:])})" if len(names) > 1 else ""
            if key == self.base_key:
                only = "" if key in read else " (its config.json only: no tensor read)"
                legend.insert(0, f"base = {names[0]}{also}{only}")
                continue
            self.labels[key] = label = f"m{len(self.labels) - (self.base_key is not None)}"
            legend.append(f"{label} = {names[0]}{also}")
        self.n_models = len(self.labels) - (self.base_key is not None)
        self.legend = "inputs: " + "; ".join(legend)
        self.routes = inputs.routes

    def head(self, cfg) -> str:
        base = f", base {cfg.base_model}" if self.base_key is not None else ""
        return (f"{cfg.method_as_written} over {_plural(len(cfg.slices), 'slice')} "
                f"({_plural(self.n_models, 'model')}{base})")

    def sources(self, name: str) -> str:
        """The input tensors output ``name`` reads, as ``label:tensor``."""
        bs, ms = self.routes[name]
        return ", ".join(f"{self.labels[self.keys[id(c)]]}:{t}"
                         for c, t in ([bs] if bs is not None else []) + ms)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def describe_plan(r: Resolved, k, budget: int) -> str:
    cfg, inputs = r.cfg, r.inputs
    ref = inputs.reference
    alpha = cfg.lines.alpha if cfg.lines is not None else None
    specs, _ = apply_lines(cfg, inputs.order, inputs.merged, r.base_specs,
                           1.0 if r.alpha_auto else alpha)
    distinct, index = resolved_parameters(specs)
    read_all = sum(inputs.in_bytes(x) for x in r.mine)
    passes, read = [], 0
    if r.model_scope:
        passes += ["scope=model level-0 histograms", "scope=model level-1 selection"]
        read += 2 * sum(inputs.in_bytes(x) for x in r.my_merged)
    if r.alpha_auto:
        passes.append("LiNeS alpha=auto statistics (merge at lambda=1, L=1)")
    sliced = _SliceInputs(cfg, inputs) if inputs.routes is not None else None
    lines, per_tensor_reads = [], 0
    for x in r.mine:
        info = ref.info(x)
        if x in specs:
            pre = _read_passes(r, k, x, specs[x])
            reads = sum(2 if p.startswith("radix selection x2") else 1 for p in pre)
            per_tensor_reads += reads * inputs.in_bytes(x)
            what = f"{cfg.method} params #{index.get(x, 0)}" + \
                (f" [{', '.join(pre)}]" if pre else "")
            if sliced is not None:
                what += f"  <- {sliced.sources(x)}"
        elif sliced is not None:
            what = f"copied from {sliced.sources(x)}"
        else:
            what = "copied from the reference model"
        lines.append(f"  {x}  {list(info.shape)}  {info.st}->{r.out_st[x]}  {what}")
    read += per_tensor_reads + read_all + (read_all if r.alpha_auto else 0)
    passes.append(k.merge_pass_label)
    written = sum(ref.info(x).numel * ST_SIZES[r.out_st[x]] for x in r.mine)
    largest = max((ref.info(x).numel for x in r.mine), default=0)
    need = r.chunking.fixed + min(largest, r.chunking.chunk_elems) * r.chunking.bytes_per_elem
    what = sliced.head(cfg) if sliced is not None else (
        f"{cfg.method_as_written} ({_plural(len(inputs.models), 'model')}"
        f"{', base ' + cfg.base_model if cfg.base_model and inputs.base is not None else ''})")
    head = [
        f"fastmerge: dry run of {what} -> {r.out_dir}",
        f"kernels: {k.name} on {k.device} ({k.merge_pass_label}); "
        f"{r.chunking.describe()}",
        f"tensors: {len(r.my_merged)} merged, {len(r.mine) - len(r.my_merged)} copied; "
        f"passes: {'; '.join(passes)}",
        f"bytes: {_size(read)} read (weights {_size(read_all)}), {_size(written)} written; "
        f"memory: {need / 2 ** 20:.0f} MiB needed of a {budget / 2 ** 20:.0f} MiB budget",
    ]
    if sliced is not None:
        head.append(sliced.legend)
    if r.alpha_auto:
        head.append("LiNeS alpha: auto (computed by its pre-pass; parameters below at "
                    "alpha = 1)")
    if r.model_scope:
        head.append("scope: model: one threshold per model over the whole model (its pre-pass)")
    params = [f"  params #{i}: " + ", ".join(f"{key}={v}" for key, v in d.items()
                                            if key not in ("method", "n_models"))
              for i, d in enumerate(distinct)]
    return "\n".join(head + ["parameter sets:"] + params + ["output tensors:"] + lines)
