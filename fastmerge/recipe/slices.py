"""``slices:`` (mergekit's frankenmerge form) -> one job per output tensor; pure, no I/O.

From a config's slices and each input model's tensor names and config.json, ``plan_slices``
lists what every output tensor is made of, as mergekit 0.1.5's planner does:
- layers: the output layer index counts on across the slices from 0; source ``s`` of a slice
  gives its layer ``layer_range[0] + k`` to output layer ``offset + k`` (the same input layer
  named by two slices becomes two output layers);
- tensors outside the layers: the embeddings (names matching ``EMBEDDING``) from the first
  slice's sources, with that slice's base and parameters; every other one (final norm,
  lm_head, ...) from the last slice's sources, of which mergekit takes only as many as the
  first slice has;
- parameters: a source's own, then its slice's, then the top-level ones (the first that
  matches wins); per-model filters are matched against the input tensor name, shared ones
  against the output name; a gradient is read at t = k / (L - 1) within a slice of L layers
  (t = 1 for L = 1) and at t = 0 outside the layers;
- the output config: the layer count key (``num_hidden_layers``, GPT-2's ``n_layer``, ...) set
  to the number of output layers, a per-layer ``layer_types`` list rebuilt layer by layer.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional

from ..methods import METHODS, MergeSpec, resolve_spec
from ..methods.lines import DEFAULT_BLOCK_PATTERN
from .config import (
    ConfigError,
    MergeConfig,
    ModelEntry,
    OutputSlice,
    ParameterResolver,
    evaluate_setting,
    slice_reads_base,
)

# model_type -> (layer name prefix, the config key holding the number of layers)
ARCHITECTURES = {
    "llama": ("model.layers.", "num_hidden_layers"),
    "mistral": ("model.layers.", "num_hidden_layers"),
    "qwen2": ("model.layers.", "num_hidden_layers"),
    "qwen3": ("model.layers.", "num_hidden_layers"),
    "gemma": ("model.layers.", "num_hidden_layers"),
    "gemma2": ("model.layers.", "num_hidden_layers"),
    "phi3": ("model.layers.", "num_hidden_layers"),
    "olmo2": ("model.layers.", "num_hidden_layers"),
    "granite": ("model.layers.", "num_hidden_layers"),
    "gpt2": ("transformer.h.", "n_layer"),
    "gpt_bigcode": ("transformer.h.", "n_layer"),
    "gptj": ("transformer.h.", "n_layer"),
    "falcon": ("transformer.h.", "num_hidden_layers"),
    "gpt_neox": ("gpt_neox.layers.", "num_hidden_layers"),
}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|"
                       r"position_embeddings|tok_embeddings|embeddings)(\.|$)")
PER_LAYER_KEYS = ("layer_types",)   # config lists with one entry per layer
# lines.py's block pattern without its index group: "(^|\.)(model\.layers|...)"
BLOCK_PREFIX = DEFAULT_BLOCK_PATTERN[:DEFAULT_BLOCK_PATTERN.rindex("\\.(\\d+)")]


@dataclass
class ModelLayout:
    """What the planner knows of one input model: its tensor names and config.json."""
    names: list
    config: dict = field(default_factory=dict)


@dataclass
class Job:
    """One output tensor: its inputs (model ref, input tensor name), where it came from."""
    name: str
    base: Optional[tuple]          # (model, tensor) or None
    models: list                   # [(model, tensor)]: the merged inputs (copied: exactly one)
    slice_index: int
    t: float
    copy: bool                     # taken from models[0] as it is (passthrough, scale 1)
    scale: Optional[float] = None  # passthrough's scale when it is not a copy


@dataclass
class SlicePlan:
    jobs: list                     # Job per output tensor, in output order
    num_layers: int
    config_model: str              # the model whose config.json the output's is made from
    config_updates: dict           # config.json keys -> their values in the output
    cfg: MergeConfig = None
    _resolvers: dict = field(default_factory=dict, repr=False)
    # what the pipeline opened: model ref -> checkpoint, model ref -> ModelLayout (a sweep
    # re-plans each point's parameters over them)
    opened: dict = field(default_factory=dict, repr=False)
    layouts: dict = field(default_factory=dict, repr=False)

    def job(self, name: str) -> Job:
        if not hasattr(self, "_by_name"):
            self._by_name = {j.name: j for j in self.jobs}
        return self._by_name[name]

    def spec_for(self, name: str, seed: Optional[int] = None) -> Optional[MergeSpec]:
        """The merge of output tensor ``name`` resolved (None: copied as it is)."""
        j = self.job(name)
        if j.copy:
            return None
        if j.scale is not None:
            return passthrough_spec(j.scale)
        key = (j.slice_index, tuple(m for m, _ in j.models), seed)
        r = self._resolvers.get(key)
        if r is None:
            r = self._resolvers[key] = _SliceResolver(self.cfg, self.cfg.slices[j.slice_index],
                                                      [m for m, _ in j.models], seed)
        return r.spec_at(name, j)

    def resolver(self, seed: Optional[int] = None):
        """An object with ``spec_for(name)`` (the driver's resolver seam)."""
        plan = self

        class _R:
            @staticmethod
            def spec_for(name: str, lines_factor: float = 1.0) -> MergeSpec:
                return plan.spec_for(name, seed)
        return _R()


def passthrough_spec(scale: float = 1.0) -> MergeSpec:
    """One model times ``scale``: passthrough where it cannot be a copy (a scale, another
    output dtype)."""
    return resolve_spec("linear", 1, weights=[float(scale)], normalize=False)


class _SliceResolver(ParameterResolver):
    """The config's parameter resolution over one slice's inputs: source, then slice, then
    top-level settings; per-model filters see the input tensor name."""

    def __init__(self, cfg: MergeConfig, sl: OutputSlice, models: list, seed):
        by_model = {s.model: s for s in sl.sources}
        entries = [ModelEntry(m, by_model[m].parameters) for m in models]
        super().__init__(dataclasses.replace(cfg, models=entries, slices=None), [], seed=seed)
        self.slice_params = sl.parameters
        self.t, self.in_names = 0.0, {}

    def spec_at(self, name: str, job: Job) -> MergeSpec:
        self.t = job.t
        self.in_names = {id(e): n for e, (_, n) in zip(self.cfg.models, job.models)}
        return self.spec_for(name)

    def t_of(self, name: str) -> float:
        return self.t

    def _value(self, name: str, t: float, key: str, model: Optional[ModelEntry]):
        where = self.in_names.get(id(model), name) if model is not None else name
        levels = ([model.parameters] if model is not None else []) + \
            [self.slice_params, self.cfg.parameters]
        for source in levels:
            if key in source:
                v = evaluate_setting(where, source[key], t)
                if v is not None:
                    return v
        return None


# ----------------------------------------------------------------------------- layer names
@dataclass
class _Layers:
    prefix_of: dict                # layer index -> the name prefix ("model.layers.3.")
    suffixes: dict                 # layer index -> [name after the prefix], checkpoint order
    outside: list                  # names outside every layer, checkpoint order
    count: int                     # layers per config.json (else per names)
    key: Optional[str]             # the config key of the layer count


def layer_pattern(config: dict) -> re.Pattern:
    """The layer-name regex of an architecture (group 1: the prefix before the index, the last
    group: the index); methods/lines.py's block pattern for an architecture not in the table."""
    arch = ARCHITECTURES.get(str(config.get("model_type", "")))
    if arch is not None:
        return re.compile(r"^(" + re.escape(arch[0]) + r")(\d+)\.")
    return re.compile(r"^(.*?" + BLOCK_PREFIX + r"\.)(\d+)\.")


def layer_count_key(config: dict) -> Optional[str]:
    arch = ARCHITECTURES.get(str(config.get("model_type", "")))
    if arch is not None and arch[1] in config:
        return arch[1]
    return next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)


def split_layers(layout: ModelLayout) -> _Layers:
    rx = layer_pattern(layout.config)
    prefix_of, suffixes, outside = {}, {}, []
    for n in layout.names:
        m = rx.match(n)
        if m is None:
            outside.append(n)
            continue
        i = int(m.groups()[-1])
        prefix_of.setdefault(i, m.group(0))
        suffixes.setdefault(i, []).append(n[m.end():])
    key = layer_count_key(layout.config)
    count = layout.config[key] if key is not None else (max(prefix_of) + 1 if prefix_of else 0)
    return _Layers(prefix_of, suffixes, outside, count, key)


# ----------------------------------------------------------------------------- the planner
def plan_slices(cfg: MergeConfig, models: dict) -> SlicePlan:
    """One job per output tensor of ``cfg.slices`` (see the module docstring); ``models``:
    model ref -> ModelLayout. Ranges past a model's layers are errors naming the key."""
    layers = {ref: split_layers(lay) for ref, lay in models.items()}
    slices = cfg.slices
    for i, sl in enumerate(slices):
        for j, s in enumerate(sl.sources):
            ly, (a, b) = layers[s.model], s.layer_range
            if b > ly.count:
                raise ConfigError(f"slices[{i}].sources[{j}].layer_range: [{a}, {b}) goes past "
                                  f"the last layer of {s.model!r}, which has {ly.count} layers "
                                  f"(0..{ly.count - 1})")
            missing = [k for k in range(a, b) if k not in ly.suffixes]
            if missing:
                raise ConfigError(f"slices[{i}].sources[{j}].layer_range: {s.model!r} has no "
                                  f"tensors of layer {missing[0]} (no name matches "
                                  f"{layer_pattern(models[s.model].config).pattern!r})")

    def inputs_of(i: int, sources: list):
        """(base source or None, the other sources) of slice i for its method."""
        base = None
        ref = slices[i].base_model or cfg.base_model
        if _reads_base(cfg, ref):
            base = next((s for s in sources if s.model == ref), None)
            if base is None:
                raise ConfigError(f"slices[{i}]: its base model {ref!r} is not among the "
                                  f"first {len(sources)} sources, which mergekit takes for the "
                                  f"tensors outside the layers")
        return base, [s for s in sources if s is not base]

    jobs: list = []

    def add(name: str, i: int, t: float, sources: list, in_name_of) -> None:
        base, others = inputs_of(i, sources)
        scale = _passthrough_scale(cfg, slices[i], others[0], in_name_of(others[0]), name, t) \
            if cfg.passthrough else None
        jobs.append(Job(name, (base.model, in_name_of(base)) if base is not None else None,
                        [(s.model, in_name_of(s)) for s in others], i, t,
                        copy=cfg.passthrough and scale is None, scale=scale))

    def outside(i: int, sources: list, pre: bool) -> None:
        first = layers[sources[0].model]
        for n in first.outside:
            if bool(EMBEDDING.search(n)) != pre:
                continue
            for s in sources[1:]:
                if n not in set(layers[s.model].outside):
                    raise ConfigError(f"slices[{i}]: model {s.model!r} has no tensor {n!r} "
                                      f"(held by {sources[0].model!r})")
            add(n, i, 0.0, sources, lambda s, n=n: n)

    outside(0, slices[0].sources, pre=True)
    out_layer = 0
    out_prefix = None
    for i, sl in enumerate(slices):
        length = sl.sources[0].length
        for k in range(length):
            t = k / (length - 1) if length > 1 else 1.0
            src0 = sl.sources[0]
            ly0 = layers[src0.model]
            idx0 = src0.layer_range[0] + k
            for j, s in enumerate(sl.sources[1:], 1):
                ly = layers[s.model]
                if set(ly.suffixes[s.layer_range[0] + k]) != set(ly0.suffixes[idx0]):
                    raise ConfigError(
                        f"slices[{i}].sources[{j}].layer_range: layer "
                        f"{s.layer_range[0] + k} of {s.model!r} does not hold the tensors of "
                        f"layer {idx0} of {src0.model!r}")
            prefix = ly0.prefix_of[idx0]
            out_prefix = out_prefix or prefix[:len(prefix) - len(str(idx0)) - 1]
            for suffix in ly0.suffixes[idx0]:
                add(f"{out_prefix}{out_layer}.{suffix}", i, t, sl.sources,
                    lambda s, k=k, suffix=suffix:
                        layers[s.model].prefix_of[s.layer_range[0] + k] + suffix)
            out_layer += 1
    # mergekit pairs the last slice's sources with as many entries as the first slice has
    outside(len(slices) - 1, slices[-1].sources[:len(slices[0].sources)], pre=False)

    config_model = cfg.base_model or slices[0].sources[0].model
    return SlicePlan(jobs, out_layer, config_model,
                     _config_updates(cfg, models, layers, config_model, out_layer), cfg)


def _reads_base(cfg: MergeConfig, ref: Optional[str]) -> bool:
    """Whether a slice with base ``ref`` merges with a base: fastmerge's methods that need
    one; mergekit's own methods whenever one is named, unless mergekit ignores it over slices
    (config.slice_reads_base; as mergekit, which takes the named base out of the slice's
    sources as the base)."""
    if cfg.passthrough:
        return False
    if cfg.is_mergekit_method:
        return ref is not None and slice_reads_base(cfg.method)
    return METHODS[cfg.method].needs_base


def _passthrough_scale(cfg: MergeConfig, sl: OutputSlice, src, in_name: str, name: str,
                       t: float) -> Optional[float]:
    """passthrough's scale for one tensor (source, slice, top level), None for 1 or unset."""
    for params, where in ((src.parameters, in_name), (sl.parameters, in_name),
                          (cfg.parameters, in_name)):
        if "scale" in params:
            v = evaluate_setting(where, params["scale"], t)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"scale for tensor {name!r}: must be a number, got {v!r}")
            return None if v == 1 else float(v)
    return None


def _config_updates(cfg: MergeConfig, models: dict, layers: dict, config_model: str,
                    num_layers: int) -> dict:
    out_cfg = models[config_model].config
    key = layers[config_model].key or "num_hidden_layers"
    updates: dict = {key: num_layers}
    for pk in PER_LAYER_KEYS:
        if not isinstance(out_cfg.get(pk), list):
            continue
        values = []
        for sl in cfg.slices:
            src = sl.sources[0]
            per_layer = models[src.model].config.get(pk)
            if not isinstance(per_layer, list) or len(per_layer) < src.layer_range[1]:
                values = None
                break
            values += per_layer[src.layer_range[0]:src.layer_range[1]]
        if values is not None:
            updates[pk] = values
    return updates
