"""Merge configs: mergekit-style YAML (plus fastmerge's own keys) -> a per-tensor MergeSpec.

mergekit's option names and value syntax keep their meaning (docs/semantics.md, "How a
mergekit YAML is read"): ``rescale: true`` is ``rescale: l1``; a list of numbers is a gradient
interpolated piecewise-linearly over block depth ``t = i / (D - 1)`` (tensors outside blocks use
t = 0; with a single block t = 1, as mergekit does); a list of ``{filter, value}`` conditions picks
the first whose filter is a substring of the tensor name (``*`` or no filter matches all).
For mergekit's method names the mergekit defaults apply (normalize true for ties only,
linear normalizes, rescale l1 for dare_*), unless ``defaults: fastmerge``.

Choices where mergekit and the issue are silent or where we differ on purpose:
- ``dtype`` / ``out_dtype``: the output dtype (out_dtype wins). mergekit also casts the inputs
  to ``dtype`` before computing; fastmerge always computes in float32 from the stored inputs
  (docs/semantics.md) and rounds once to the output dtype.
- ``weight`` defaults to 1 (mergekit requires it for most methods).
- ``int8_mask`` is accepted and has no effect (it only changes mergekit's memory use).
- Parameters set per model may only be per-model ones (weight, density, gamma,
  consensus_lambda); shared ones (lambda, normalize, rescale, seed, ...) go under the
  top-level ``parameters``. Both levels take gradients and filter conditions; a per-model
  setting whose conditions match nothing falls back to the global one, then the default.
- fastmerge's own keys: ``scope: tensor|model``, ``lines: {alpha, beta, outside, pattern}``,
  ``defaults: mergekit|fastmerge``, per-model ``preconditioner_path`` (ffg/ota), and the
  fastmerge parameters election, elect_on, seed, consensus_k, consensus_lambda, ffg_metric,
  power, ota_normalize, eps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..methods import (
    ALIASES,
    ELECT_ON,
    ELECTIONS,
    FFG_METRICS,
    METHODS,
    NORMALIZES,
    OTA_NORMALIZES,
    RESCALES,
    MergeSpec,
    canonical_method,
    resolve_spec,
)
from ..methods.lines import DEFAULT_BLOCK_PATTERN, block_index, count_blocks
from . import mergekit_params as mk


class ConfigError(ValueError):
    """A merge config that cannot be run, with what is supported."""


TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "scope", "lines", "defaults", "name", "slices", "tokenizer")
UNSUPPORTED_TOP = {
    "modules": "per-module definitions are not supported; list whole models under 'models'",
    "chat_template": "chat_template is not supported; the base model's tokenizer files "
                     "are copied as they are",
}
# mergekit 0.1.5's method names: only the wording of an error for one fastmerge lacks (what
# is supported always comes from the registry, fastmerge.methods.METHODS)
MERGEKIT_NAMES = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                  "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "multislerp",
                  "karcher", "model_stock", "passthrough", "sce", "nearswap", "arcee_fusion",
                  "ranked_ties", "ram", "ramplus_tl", "task_adapter")
# mergekit's names with mergekit's defaults
MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                    "breadcrumbs", "breadcrumbs_ties")

# per-model parameters (may also be given globally): config name -> resolve_spec argument
MODEL_PARAMS = {"weight": "weights", "density": "density", "gamma": "gamma",
                "consensus_lambda": "consensus_lambda"}
MODEL_DEFAULTS = {"weight": 1.0, "gamma": 0.01, "consensus_lambda": 0.6}
# shared parameters: config name -> resolve_spec argument (None: accepted, no effect here)
SHARED_PARAMS = {"lambda": "lambda_", "normalize": "normalize", "rescale": "rescale",
                 "int8_mask": None, "election": "election", "consensus_method": "election",
                 "elect_on": "elect_on", "seed": "seed", "consensus_k": "consensus_k",
                 "ffg_metric": "ffg_metric", "power": "power", "ota_normalize": "ota_normalize",
                 "eps": "eps"}
MODEL_KEYS = ("model", "parameters", "preconditioner_path")
# dtype spellings -> the canonical name the config keeps (torch's, without "torch.")
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16", "half": "float16", "float32": "float32",
          "fp32": "float32", "float": "float32"}
LINES_KEYS = ("alpha", "beta", "outside", "pattern")


def supported_methods() -> str:
    """The method names a config may use, from the method registries (fastmerge.methods and
    fastmerge.methods.mergekit_methods)."""
    return ", ".join(sorted(list(METHODS) + list(ALIASES) + list(mk.MERGEKIT_METHODS)))


def method_info(name: str):
    """The MethodInfo of a fastmerge method or of a mergekit one (recipe/mergekit_params)."""
    return mk.info(name) if mk.is_mergekit_method(name) else METHODS[name]


def _unsupported_method(method) -> ConfigError:
    import difflib
    if method in MERGEKIT_NAMES:
        return ConfigError(f"merge_method {method!r} is a mergekit method fastmerge does not "
                           f"implement; supported: {supported_methods()}")
    close = difflib.get_close_matches(str(method), list(METHODS) + list(ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown merge_method {method!r}{hint}; supported: "
                       f"{supported_methods()}")


def _kind(value) -> str:
    return "nothing" if value is None else f"a {type(value).__name__} ({value!r:.60})"


def _known_keys(where: str, mapping: dict, keys) -> None:
    """A ConfigError naming the first key of ``mapping`` not in ``keys``."""
    for k in mapping:
        if k not in keys:
            raise ConfigError(f"{where}: unknown key {k!r}; supported: {', '.join(keys)}")


@dataclass
class ModelEntry:
    ref: str
    parameters: dict = field(default_factory=dict)
    preconditioner_path: Optional[str] = None


@dataclass
class LinesConfig:
    alpha: Union[float, str]
    beta: float
    outside: str = "alpha"
    pattern: str = DEFAULT_BLOCK_PATTERN


@dataclass
class MergeConfig:
    method: str                      # canonical fastmerge method name
    method_as_written: str
    base_model: Optional[str]
    models: list
    parameters: dict
    dtype: Optional[str] = None      # "bfloat16", "float16" or "float32"
    out_dtype: Optional[str] = None
    scope: str = "tensor"
    lines: Optional[LinesConfig] = None
    defaults: str = "mergekit"
    tokenizer_source: Optional[str] = None   # None, "base", "union" or "model:<ref>"
    raw: dict = field(default_factory=dict)
    base_dir: Optional[Path] = None
    slices: Optional[list] = None            # OutputSlice per entry of ``slices:``

    @property
    def tokenizer_model(self) -> Optional[str]:
        """The model whose tokenizer files are copied, when the config names one."""
        tok = self.tokenizer_source or ""
        return tok[len("model:"):] if tok.startswith("model:") else None

    @property
    def passthrough(self) -> bool:
        return self.method_as_written == "passthrough"

    @property
    def output_dtype(self) -> Optional[str]:
        return self.out_dtype or self.dtype

    @property
    def info(self):
        return method_info(self.method)

    @property
    def is_mergekit_method(self) -> bool:
        """A method of fastmerge/methods/mergekit_methods.py (per-tensor reductions + apply)."""
        return mk.is_mergekit_method(self.method)

    @property
    def needs_base(self) -> bool:
        """Whether the base checkpoint is read (a mergekit method reads it when given)."""
        if self.is_mergekit_method:
            return self.base_model is not None and \
                mk.MERGEKIT_METHODS[self.method].schema.base != "ignored"
        return METHODS[self.method].needs_base

    @property
    def uses_mergekit_defaults(self) -> bool:
        return self.defaults == "mergekit" and self.method_as_written in MERGEKIT_METHODS


# ----------------------------------------------------------------------------- value syntax
def _is_scalar(x) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


# What each parameter's values must be, checked where the config is read so that an error names
# the key path: numbers (True: whole numbers) or one of the choices. Ranges are checked per
# tensor by resolve_spec (the error names the tensor a gradient or condition gave the value).
_NUMBER_RULES = {"weight": False, "density": False, "gamma": False, "consensus_lambda": False,
                 "lambda": False, "power": False, "eps": False, "consensus_k": True,
                 "seed": True, "scale": False}
_NULLABLE = ("scale",)   # passthrough's scale: null is none, as in mergekit
_CHOICE_RULES = {"normalize": NORMALIZES, "rescale": RESCALES + (True, False, "none", "None"),
                 "election": ELECTIONS, "consensus_method": ELECTIONS, "elect_on": ELECT_ON,
                 "ffg_metric": FFG_METRICS, "ota_normalize": OTA_NORMALIZES,
                 "int8_mask": (True, False)}


def _check_leaf(where: str, key: str, value) -> None:
    """One value of parameter ``key`` (a scalar, one element of a gradient or a condition)."""
    if key in _NUMBER_RULES:
        whole = _NUMBER_RULES[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be finite, got {value!r}")
        if whole and value != int(value):
            raise ConfigError(f"{where}: must be a whole number, got {value!r}")
    elif key in _CHOICE_RULES:
        allowed = _CHOICE_RULES[key]
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise ConfigError(f"{where}: must be one of "
                              f"{', '.join(repr(a) for a in allowed)}; got {value!r}")


def _check_setting(where: str, setting, key: Optional[str] = None) -> None:
    """Reject a malformed value early: scalar, non-empty list of scalars (a gradient), or
    non-empty list of {filter, value} conditions; with ``key``, each value is also checked as
    that parameter's value (a number in range, or one of its choices)."""
    if _is_scalar(setting):
        if setting is None and key in _NUMBER_RULES and key not in _NULLABLE:
            raise ConfigError(f"{where}: no value given")
        if setting is not None:
            _check_leaf(where, key, setting)
        return
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        raise ConfigError(f"{where}: expected a value, a list of numbers (gradient) or a list "
                          f"of {{filter, value}} conditions; got {setting!r}")
    if not setting:
        raise ConfigError(f"{where}: an empty list (give a value, a gradient or conditions)")
    if all(_is_scalar(e) for e in setting):
        for i, e in enumerate(setting):
            if e is None:
                raise ConfigError(f"{where}[{i}]: no value given")
            _check_leaf(f"{where}[{i}]", key, e)
        return
    for i, cond in enumerate(setting):
        if not isinstance(cond, dict) or not set(cond) <= {"filter", "value"} or \
                "value" not in cond:
            raise ConfigError(f"{where}[{i}]: a list that is not a gradient of numbers must "
                              f"hold {{filter, value}} conditions; got {cond!r}")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise ConfigError(f"{where}[{i}].filter: must be a string, got {cond['filter']!r}")
        _check_setting(f"{where}[{i}].value", cond["value"], key)


def evaluate_setting(tensor_name: str, setting, t: float):
    """mergekit's evaluation: scalars as they are, numeric lists interpolated over t,
    conditions matched by substring (first match wins); None when no condition matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if not setting:
        return None
    if all(_is_scalar(e) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(tensor_name, cond.get("value"), t)
    return None


# ----------------------------------------------------------------------------- parsing
def _dtype(where: str, value) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or value not in DTYPES:
        raise ConfigError(f"{where}: unsupported dtype {value!r}; use one of "
                          f"{', '.join(DTYPES)}")
    return DTYPES[value]


def _mergekit_models(method: str, base, models: list, raw: dict) -> list:
    """mergekit's inputs: a base listed among the models is the base (not for passthrough,
    which ignores the base); then the counts the method needs."""
    reads_base = mk.MERGEKIT_METHODS[method].schema.base != "ignored"
    if base is not None and reads_base:
        models = [m for m in models if m.ref != base]
    try:
        mk.check_inputs(method, base is not None and reads_base, len(models))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return models


def _check_params(where: str, params, allowed: dict, mergekit: Optional[str] = None) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: must be a mapping of parameter names to values, got "
                          f"{_kind(params)}")
    for k, v in params.items():
        if k not in allowed:
            if (where.startswith("models[") or ".sources[" in where) and k in SHARED_PARAMS:
                raise ConfigError(f"{where}: {k!r} is shared by all models; set it under the "
                                  f"top-level 'parameters'")
            of = f" of merge_method {mergekit!r}" if mergekit else ""
            raise ConfigError(f"{where}: unknown parameter {k!r}{of}; supported: "
                              f"{', '.join(sorted(allowed)) or 'none'}")
        if mergekit is None:
            _check_setting(f"{where}.{k}", v, k)
            continue
        _check_setting(f"{where}.{k}", v, None)
        try:
            mk.check_leaves(mergekit, f"{where}.{k}", k, v)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return dict(params)


def parse_config(raw: dict, base_dir: Optional[Path] = None) -> MergeConfig:
    """Validate a config mapping (parsed YAML) and return a MergeConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a merge config must be a YAML mapping (key: value lines), got "
                          f"{'an empty file' if raw is None else _kind(raw)}")
    for k in raw:
        if k in UNSUPPORTED_TOP:
            raise ConfigError(f"config key {k!r}: {UNSUPPORTED_TOP[k]}")
        if k not in TOP_KEYS:
            raise ConfigError(f"unknown config key {k!r}; supported keys: {', '.join(TOP_KEYS)}")
    method = raw.get("merge_method")
    if method is None:
        raise ConfigError(f"the config needs 'merge_method' (one of {supported_methods()})")
    if "slices" in raw and "models" in raw:
        raise ConfigError("give either 'models' or 'slices', not both (mergekit takes exactly "
                          "one of them)")
    try:
        # slices: passthrough copies one source, which is a one-model linear merge
        # (weight = scale, no normalisation) where it cannot be a plain copy
        canon = "linear" if method == "passthrough" and "slices" in raw else \
            method if mk.is_mergekit_method(method) else canonical_method(method)
    except ValueError:
        raise _unsupported_method(method) from None
    mergekit = mk.is_mergekit_method(canon)
    defaults = raw.get("defaults", "mergekit")
    if defaults not in ("mergekit", "fastmerge"):
        raise ConfigError(f"defaults must be 'mergekit' or 'fastmerge', got {defaults!r}")
    if "slices" in raw:
        return _parse_sliced(raw, canon, method, defaults, base_dir)
    if "models" not in raw:
        raise ConfigError("the config needs a 'models' list (or 'slices')")
    models_raw = raw["models"]
    if not isinstance(models_raw, list):
        raise ConfigError(f"models: must be a list of models, got {_kind(models_raw)}")
    if not models_raw:
        raise ConfigError("models: an empty list (list the models to merge)")
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"base_model must be a path or hub id, got {base!r}")
    allowed_global = {**{k: v for k, v in MODEL_PARAMS.items()}, **SHARED_PARAMS}
    allowed_model = MODEL_PARAMS
    if mergekit:
        allowed_global, allowed_model = mk.allowed(canon, False), mk.allowed(canon, True)
    params = _check_params("parameters", raw.get("parameters"), allowed_global,
                           canon if mergekit else None)
    models = []
    for i, m in enumerate(models_raw):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"models[{i}]: must be a path or a mapping with a 'model' key, "
                              f"got {_kind(m)}")
        _known_keys(f"models[{i}]", m, MODEL_KEYS)
        if not isinstance(m["model"], str):
            raise ConfigError(f"models[{i}].model must be a path or hub id, got {m['model']!r}")
        mp = _check_params(f"models[{i}].parameters", m.get("parameters"), allowed_model,
                           canon if mergekit else None)
        pre = m.get("preconditioner_path")
        if pre is not None and not isinstance(pre, str):
            raise ConfigError(f"models[{i}].preconditioner_path must be a path")
        models.append(ModelEntry(m["model"], mp, pre))
    if mergekit:
        models = _mergekit_models(canon, base, models, raw)
    elif METHODS[canon].needs_base:
        if base is None:
            raise ConfigError(f"merge_method {method!r} needs a base_model")
        # mergekit: the base model may also be listed among the models; it is the base there
        models = [m for m in models if m.ref != base]
        if not models:
            raise ConfigError("the config lists no model other than the base_model")
    scope = raw.get("scope", "tensor")
    if scope not in ("tensor", "model"):
        raise ConfigError(f"scope must be 'tensor' or 'model', got {scope!r}")
    tok = _tokenizer_source(raw)
    if mergekit and scope != "tensor":
        raise ConfigError(f"scope: {scope!r} does not apply to merge_method {canon!r}")
    if mergekit and raw.get("lines") is not None:
        raise ConfigError(f"lines: LiNeS does not apply to merge_method {canon!r}")
    lines = None
    if raw.get("lines") is not None:
        lr = raw["lines"]
        if not isinstance(lr, dict):
            raise ConfigError("lines must be a mapping {alpha, beta, outside, pattern}")
        _known_keys("lines", lr, LINES_KEYS)
        if "beta" not in lr:
            raise ConfigError("lines needs 'beta' (the paper tunes it on 0.1 .. 1.0; there is "
                              "no universal default)")
        alpha = lr.get("alpha", 1.0)
        if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                or not math.isfinite(alpha)):
            raise ConfigError(f"lines.alpha must be a number or 'auto', got {alpha!r}")
        beta = lr["beta"]
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or \
                not math.isfinite(beta):
            raise ConfigError(f"lines.beta must be a number, got {beta!r}")
        outside = lr.get("outside", "alpha")
        if outside not in ("alpha", "ends"):
            raise ConfigError(f"lines.outside must be 'alpha' or 'ends', got {outside!r}")
        pattern = lr.get("pattern", DEFAULT_BLOCK_PATTERN)
        try:
            import re
            rx = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ConfigError(f"lines.pattern is not a valid regex: {exc}") from None
        if rx.groups < 1:
            raise ConfigError("lines.pattern needs a capture group for the block index, "
                              "e.g. '(^|\\.)layers\\.(\\d+)\\.'")
        if METHODS[canon].combine == "linear":
            raise ConfigError("LiNeS scales task vectors; it does not apply to 'linear'")
        lines = LinesConfig(alpha if alpha == "auto" else float(alpha), float(beta), outside,
                            pattern)
    return MergeConfig(
        method=canon, method_as_written=method, base_model=base, models=models,
        parameters=params, dtype=_dtype("dtype", raw.get("dtype")),
        out_dtype=_dtype("out_dtype", raw.get("out_dtype")), scope=scope, lines=lines,
        defaults=defaults, tokenizer_source=tok, raw=raw, base_dir=base_dir)


# ----------------------------------------------------------------------------- slices, tokenizer
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")


@dataclass
class SliceSource:
    model: str
    layer_range: tuple               # [start, stop) of this model's layers
    parameters: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass
class OutputSlice:
    sources: list                    # SliceSource, in config order
    base_model: Optional[str] = None  # the slice's own base_model (else the top-level one)
    parameters: dict = field(default_factory=dict)


def _layer_range(where: str, value) -> tuple:
    if value is None:
        raise ConfigError(f"{where}: missing; give the half-open layer range [start, end), "
                          f"e.g. [0, 16]")
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{where}: must be two layer indices [start, end), got {_kind(value)}")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or x != int(x)
           for x in value):
        raise ConfigError(f"{where}: layer indices must be whole numbers, got {list(value)!r}")
    a, b = int(value[0]), int(value[1])
    if a < 0:
        raise ConfigError(f"{where}: layer index {a} is negative")
    if b < a:
        raise ConfigError(f"{where}: [{a}, {b}) is reversed (start after end)")
    if b == a:
        raise ConfigError(f"{where}: [{a}, {b}) is empty (the range is half-open: [start, end))")
    return a, b


def _parse_slice(i: int, sl, method: str, canon: str, mergekit: Optional[str], base,
                 per_source: dict, shared: dict) -> OutputSlice:
    where = f"slices[{i}]"
    if not isinstance(sl, dict):
        raise ConfigError(f"{where}: must be a mapping with 'sources', got {_kind(sl)}")
    _known_keys(where, sl, SLICE_KEYS)
    srcs = sl.get("sources")
    if not isinstance(srcs, list) or not srcs:
        raise ConfigError(f"{where}.sources: must be a non-empty list of {{model, layer_range}}, "
                          f"got {_kind(srcs)}")
    sbase = sl.get("base_model")
    if sbase is not None and not isinstance(sbase, str):
        raise ConfigError(f"{where}.base_model must be a path or hub id, got {sbase!r}")
    rw = sl.get("residual_weight")   # mergekit 0.1.5 accepts it and reads it nowhere
    if rw is not None and (isinstance(rw, bool) or not isinstance(rw, (int, float))):
        raise ConfigError(f"{where}.residual_weight: must be a number, got {rw!r}")
    params = _check_params(f"{where}.parameters", sl.get("parameters"), shared, mergekit)
    sources: list = []
    for j, src in enumerate(srcs):
        w = f"{where}.sources[{j}]"
        if not isinstance(src, dict):
            raise ConfigError(f"{w}: must be a mapping {{model, layer_range}}, got {_kind(src)}")
        _known_keys(w, src, SOURCE_KEYS)
        if not isinstance(src.get("model"), str):
            raise ConfigError(f"{w}.model must be a path or hub id, got {_kind(src.get('model'))}")
        rng = _layer_range(f"{w}.layer_range", src.get("layer_range"))
        if any(s.model == src["model"] for s in sources):
            raise ConfigError(f"{w}.model: {src['model']!r} is listed twice in this slice (an "
                              f"input of a merge is a model); put the layers in two slices")
        sources.append(SliceSource(src["model"], rng,
                                   _check_params(f"{w}.parameters", src.get("parameters"),
                                                 per_source, mergekit)))
        if sources[-1].length != sources[0].length:
            raise ConfigError(f"{w}.layer_range: {list(rng)} holds {sources[-1].length} layers "
                              f"but {where}.sources[0].layer_range "
                              f"{list(sources[0].layer_range)} holds {sources[0].length}; every "
                              f"source of a slice needs the same number of layers")
    slice_base = sbase or base
    if mergekit is not None:
        _check_slice_inputs(where, mergekit, slice_base, sources)
    elif method == "passthrough":
        if len(sources) != 1:
            raise ConfigError(f"{where}.sources: passthrough copies exactly one source per "
                              f"slice, got {len(sources)}")
    elif METHODS[canon].needs_base:
        if slice_base is None:
            raise ConfigError(f"{where}: merge_method {method!r} needs a base_model (top-level "
                              f"or {where}.base_model)")
        if all(s.model != slice_base for s in sources):
            raise ConfigError(f"{where}.sources: the base model {slice_base!r} must be one of "
                              f"the slice's sources (with the layer_range it contributes)")
        if len(sources) < 2:
            raise ConfigError(f"{where}.sources: only the base model; merge_method {method!r} "
                              f"needs another source")
    return OutputSlice(sources, sbase, params)


# mergekit 0.1.5's contracts over slices, decided method by method where fastmerge's schema
# says base "input" (over 'models:' a named base is one more input: mergekit's planner appends
# it): karcher.py declares no InputContract, so BasePolicy.IGNORED drops a slice's base
SLICE_BASE_IGNORED = frozenset({"karcher"})


def slice_reads_base(method: str) -> bool:
    """Whether mergekit's ``method`` over slices takes a named base out of a slice's sources
    (then it must be one of them); else the sources are the inputs, as listed."""
    return mk.MERGEKIT_METHODS[method].schema.base != "ignored" and \
        method not in SLICE_BASE_IGNORED


def _check_slice_inputs(where: str, method: str, slice_base, sources: list) -> None:
    """mergekit's check of one slice for its own methods: a base it reads must be one of the
    slice's sources; then the input counts the method takes."""
    schema = mk.MERGEKIT_METHODS[method].schema
    if schema.base == "required" and slice_base is None:
        raise ConfigError(f"{where}: merge_method {method!r} needs a base_model (top-level "
                          f"or {where}.base_model)")
    reads_base = slice_reads_base(method)
    if reads_base and slice_base is not None and all(s.model != slice_base for s in sources):
        raise ConfigError(f"{where}.sources: the base model {slice_base!r} must be one of "
                          f"the slice's sources (with the layer_range it contributes)")
    has_base = reads_base and slice_base is not None
    try:
        mk.check_inputs(method, has_base, len(sources) - (1 if has_base else 0))
    except ValueError as exc:
        raise ConfigError(f"{where}.sources: {str(exc).split(': ', 1)[1]}") from None


def _possible(setting, t: float) -> list:
    """The values a setting can give at depth ``t`` for some tensor name: a gradient's value
    at t, each condition's (None: a tensor no condition matches falls through)."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting) or all(_is_scalar(e) for e in setting):
        return [evaluate_setting("", setting, t)]
    out = []
    for cond in setting:
        out += _possible(cond.get("value"), t)
        if cond.get("filter") in (None, "*"):
            return out
    return out + [None]


def _slice_depths(i: int, sl: OutputSlice, n_slices: int) -> list:
    """The t a slice's tensors are merged at: its layers', and 0 outside the layers (the
    embeddings from the first slice, the final norm and lm_head from the last)."""
    n = sl.sources[0].length
    ts = [k / (n - 1) for k in range(n)] if n > 1 else [1.0]
    return ts + ([0.0] if i in (0, n_slices - 1) else [])


# the value combinations one slice's check tries at most (conditions multiply them)
_MAX_COMBINATIONS = 256


def _check_slice_values(i: int, sl: OutputSlice, n_slices: int, method: str, slice_base,
                        top: dict) -> None:
    """What mergekit's schema checks per tensor (a required parameter set, della's density +-
    epsilon inside (0, 1), ...), checked here for every depth and condition of slice ``i`` so
    that the error names the key: ``slices[i].sources[j].parameters.X`` or
    ``slices[i].parameters.X`` (where the value came from, else where to set it)."""
    import itertools
    schema = mk.MERGEKIT_METHODS[method].schema
    reads_base = slice_reads_base(method) and slice_base is not None
    models = [(j, s) for j, s in enumerate(sl.sources)
              if not (reads_base and s.model == slice_base)]

    def chain(j: Optional[int]) -> list:
        """Where a parameter is looked up: the source (per-model ones), the slice, the top."""
        own = [] if j is None else [(f"slices[{i}].sources[{j}].parameters",
                                     sl.sources[j].parameters)]
        return own + [(f"slices[{i}].parameters", sl.parameters), ("parameters", top)]

    def choices(key: str, j: Optional[int], t: float) -> list:
        """[(value or None, the key path that gave it or None)]."""
        out = []
        for where, params in chain(j):
            if key not in params:
                continue
            vals = _possible(params[key], t)
            out += [(v, f"{where}.{key}") for v in vals if v is not None]
            if None not in vals:
                return out
        return out + [(None, None)]

    slots = [(p.name, None) for p in schema.params if p.scope == "global"]
    slots += [(p.name, j) for p in schema.params if p.scope != "global" for j, _ in models]
    for t in _slice_depths(i, sl, n_slices):
        options = [choices(k, j, t) for k, j in slots]
        combos = itertools.product(*options)
        for combo in itertools.islice(combos, _MAX_COMBINATIONS):
            got = {slot: c for slot, c in zip(slots, combo)}

            def value(key, idx, got=got):
                return got[(key, None if idx is None else models[idx][0])][0]
            try:
                mk.resolve(method, len(models), value, 0)
            except ValueError as exc:
                raise _slice_value_error(i, exc, schema, models, got) from None


def _slice_value_error(i: int, exc: ValueError, schema, models: list, got: dict) -> ConfigError:
    """The schema's per-tensor error, naming the key of the parameter it is about: the first
    parameter the message names that the config sets, else where to set the first one."""
    import re
    text = str(exc).split(": ", 1)[-1]
    named = re.findall(r"\b(" + "|".join(re.escape(p.name) for p in schema.params) + r")\b",
                       text) or [schema.params[0].name]
    m = re.search(r"(?:models|" + re.escape(named[0]) + r")\[(\d+)\]", text)
    j = models[min(int(m.group(1)) if m else 0, len(models) - 1)][0] if models else 0

    def slot(key):
        return key, None if schema.param(key).scope == "global" else j
    key = next((k for k in named if got.get(slot(k), (None, None))[1] is not None), named[0])
    text = re.sub(re.escape(named[0]) + r"\[\d+\]", named[0], text)   # "epsilon[1] = 0.6"
    source = got.get(slot(key), (None, None))[1]
    if source is not None:
        return ConfigError(f"{source}: {text}")
    shared = slot(key)[1] is None
    where = f"slices[{i}].parameters" if shared else f"slices[{i}].sources[{j}].parameters"
    if "required" not in text:
        return ConfigError(f"{where}.{key}: {text}")
    return ConfigError(f"{where}.{key}: required by merge_method {schema.name!r} (set it here"
                       f"{'' if shared else f', under slices[{i}].parameters'} or under the "
                       f"top-level parameters)")


def _parse_sliced(raw: dict, canon: str, method: str, defaults: str,
                  base_dir: Optional[Path]) -> MergeConfig:
    """A config with ``slices:`` (mergekit's frankenmerge form): the slices checked here; the
    layers they name are checked against each model by recipe/slices.py."""
    # passthrough's one parameter is the per-source 'scale'; the other methods take the
    # parameters of a 'models:' config at the same levels
    per_source = {"scale": None} if method == "passthrough" else MODEL_PARAMS
    shared = {"scale": None} if method == "passthrough" else {**MODEL_PARAMS, **SHARED_PARAMS}
    mergekit = canon if mk.is_mergekit_method(canon) else None
    if mergekit is not None:   # mergekit's own methods: their parameters, at the same levels
        per_source, shared = mk.allowed(canon, True), mk.allowed(canon, False)
    if raw.get("lines") is not None:
        raise ConfigError("lines: LiNeS is not supported with 'slices' (use 'models')")
    if raw.get("scope", "tensor") != "tensor":
        raise ConfigError("scope: only 'tensor' is supported with 'slices'")
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"base_model must be a path or hub id, got {base!r}")
    params = _check_params("parameters", raw.get("parameters"), shared, mergekit)
    slices_raw = raw["slices"]
    if not isinstance(slices_raw, list) or not slices_raw:
        raise ConfigError(f"slices: must be a non-empty list of slices, got {_kind(slices_raw)}")
    slices = [_parse_slice(i, sl, method, canon, mergekit, base, per_source, shared)
              for i, sl in enumerate(slices_raw)]
    for i, sl in enumerate(slices):
        if mergekit is not None:
            _check_slice_values(i, sl, len(slices), mergekit, sl.base_model or base, params)
    refs: list = []
    for sl in slices:
        for r in [s.model for s in sl.sources] + [sl.base_model or base]:
            if r is not None and r not in refs:
                refs.append(r)
    return MergeConfig(
        method=canon, method_as_written=method, base_model=base,
        models=[ModelEntry(r) for r in refs], parameters=params,
        dtype=_dtype("dtype", raw.get("dtype")),
        out_dtype=_dtype("out_dtype", raw.get("out_dtype")), defaults=defaults,
        tokenizer_source=_tokenizer_source(raw), raw=raw, base_dir=base_dir, slices=slices)


def _tokenizer_source(raw: dict) -> Optional[str]:
    """None, "base", "union" or "model:<ref>" from ``tokenizer_source`` or a ``tokenizer:``
    block (its ``source``; ``pad_to_multiple_of`` is read from cfg.raw by pipeline/vocabulary)."""
    tok, block, key = raw.get("tokenizer_source"), raw.get("tokenizer"), "tokenizer_source"
    if tok is not None and block is not None:
        raise ConfigError("give 'tokenizer_source' or a 'tokenizer' block, not both")
    if block is not None:
        if not isinstance(block, dict):
            raise ConfigError(f"tokenizer: must be a mapping {{source, tokens, "
                              f"pad_to_multiple_of}}, got {_kind(block)}")
        _known_keys("tokenizer", block, TOKENIZER_KEYS)
        if block.get("tokens") is not None:
            raise ConfigError("tokenizer.tokens: not supported yet (per-token embedding "
                              "sources); mergekit's default rules apply (docs/semantics.md)")
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise ConfigError(f"tokenizer.pad_to_multiple_of: must be a positive integer, got "
                              f"{_kind(pad)}")
        tok, key = block.get("source", "union"), "tokenizer.source"
    if tok is None:
        return None
    if not isinstance(tok, str) or tok in ("", "model:"):
        raise ConfigError(f"{key}: must be 'base', 'union' or 'model:<path or hub id>', got "
                          f"{_kind(tok)}")
    if tok == "union" and raw.get("slices") is not None:
        raise ConfigError(f"{key}: 'union' (a merged vocabulary) is not supported yet with "
                          f"slices:; use 'base' or 'model:<path>' (tokenizer files copied)")
    if tok in ("base", "union"):
        return tok
    # mergekit names the model directly; 'model:' is accepted as a prefix
    return "model:" + (tok[len("model:"):] if tok.startswith("model:") else tok)


def _yaml_problem(exc) -> str:
    """One line from a PyYAML error (its str() spans several lines with a source excerpt)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    return problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")


def _read_config_file(p: Path) -> str:
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory, not a YAML file")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start}); is it a YAML "
                          f"file?") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None


def load_config(source) -> MergeConfig:
    """A MergeConfig from a YAML file path, a YAML string or a mapping; errors name the file."""
    import yaml
    base_dir = None
    if isinstance(source, dict):
        return parse_config(source)
    if isinstance(source, Path) or isinstance(source, str) and "\n" not in source:
        p = Path(source)
        text, base_dir, label = _read_config_file(p), p.parent.resolve(), f"config {p}"
    elif isinstance(source, str):
        text, label = source, "config"
    else:
        raise ConfigError(f"a config is a YAML file path, a YAML string or a mapping, got "
                          f"{type(source).__name__}")
    try:
        raw = yaml.safe_load(text)   # safe_load: no python tags, no code from a config
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{label} is nested too deeply to be a merge config") from None
    try:
        return parse_config(raw, base_dir)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None


# ----------------------------------------------------------------------------- per tensor
class ParameterResolver:
    """Evaluates the config's settings for each tensor name into a MergeSpec."""

    def __init__(self, cfg: MergeConfig, names, seed: Optional[int] = None,
                 pattern: Optional[str] = None):
        self.cfg = cfg
        self.pattern = pattern or (cfg.lines.pattern if cfg.lines else DEFAULT_BLOCK_PATTERN)
        self.num_blocks = count_blocks(names, self.pattern)
        self.seed = seed
        self._cache: dict = {}

    def t_of(self, name: str) -> float:
        i = block_index(name, self.pattern)
        if i is None:
            return 0.0
        return i / (self.num_blocks - 1) if self.num_blocks > 1 else 1.0

    def _value(self, name: str, t: float, key: str, model: Optional[ModelEntry]):
        for source in ([model.parameters] if model is not None else []) + [self.cfg.parameters]:
            if key in source:
                v = evaluate_setting(name, source[key], t)
                if v is not None:
                    return v
        return None

    def kwargs_for(self, name: str) -> dict:
        cfg, t = self.cfg, self.t_of(name)
        mk = cfg.uses_mergekit_defaults
        kw: dict[str, Any] = {}
        for key, arg in MODEL_PARAMS.items():
            vals = []
            for m in cfg.models:
                v = self._value(name, t, key, m)
                if v is None:
                    v = 1.0 if key == "density" and mk else (
                        METHODS[cfg.method].density if key == "density" else MODEL_DEFAULTS[key])
                vals.append(v)
            kw[arg] = vals
        for key, arg in SHARED_PARAMS.items():
            v = self._value(name, t, key, None)
            if arg is None or v is None:
                continue
            kw[arg] = v
        if mk:
            kw.setdefault("normalize", cfg.method in ("ties", "linear"))
            kw.setdefault("rescale", "l1" if cfg.method in ("dare_ties", "dare_linear") else None)
        if kw.get("rescale") in ("none", "None"):
            kw["rescale"] = None
        if self.seed is not None:
            kw["seed"] = self.seed
        if isinstance(kw.get("seed"), float) and kw["seed"].is_integer():
            kw["seed"] = int(kw["seed"])
        if isinstance(kw.get("consensus_k"), float) and kw["consensus_k"].is_integer():
            kw["consensus_k"] = int(kw["consensus_k"])
        kw["scope"] = cfg.scope
        return kw

    def mergekit_spec_for(self, name: str) -> mk.MergekitSpec:
        t, models = self.t_of(name), self.cfg.models

        def value(key, i):
            return self._value(name, t, key, None if i is None else models[i])
        try:
            return mk.resolve(self.cfg.method, len(models), value, self.seed)
        except ValueError as exc:
            raise ConfigError(f"config parameters for tensor {name!r}: {exc}") from None

    def spec_for(self, name: str, lines_factor: float = 1.0) -> MergeSpec:
        if self.cfg.is_mergekit_method:
            return self.mergekit_spec_for(name)
        kw = self.kwargs_for(name)
        key = (repr(sorted(kw.items())), lines_factor)
        spec = self._cache.get(key)
        if spec is None:
            try:
                spec = resolve_spec(self.cfg.method, len(self.cfg.models),
                                    lines_factor=lines_factor, **kw)
            except ValueError as exc:
                raise ConfigError(f"config parameters for tensor {name!r}: {exc}") from None
            self._cache[key] = spec
        return spec
