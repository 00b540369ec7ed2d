"""A sweep's grid: ``KEY=V1,V2,...`` settings over a config, their cartesian product, each
point's config (the raw mapping with its values set, validated exactly like a config file)
and a readable directory name per point; torch-free."""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import ConfigError, MergeConfig, parse_config

# keys that would change what is read: a sweep reads one set of inputs
INPUT_KEYS = ("base_model", "models", "slices", "tokenizer_source", "tokenizer")
TOP_LEVEL = ("merge_method", "dtype", "out_dtype", "scope", "defaults")
_MODEL_KEY = re.compile(r"models\[(\d+)\]\.(?:parameters\.)?(\w+)")
# a 'slices:' config's own parameters: slices[i].PARAM, slices[i].sources[j].PARAM
_SLICE_KEY = re.compile(r"slices\[(\d+)\]\.(?:sources\[(\d+)\]\.)?(?:parameters\.)?(\w+)")
_SLICE_INPUTS = ("model", "layer_range", "base_model", "sources")
_MODEL_INPUTS = ("model", "preconditioner_path")
_SLICE_INPUT_KEY = re.compile(r"slices\[\d+\]\.(?:base_model|sources|"
                              r"sources\[\d+\]\.(?:model|layer_range)(?:\[\d+\])?)")


@dataclass
class Point:
    name: str                 # the directory under OUT_DIR
    values: dict              # grid key -> value
    raw: dict                 # the point's config mapping
    cfg: MergeConfig


def parse_value(text: str):
    """A grid value as YAML reads it (0.5 -> float, ties -> str, true -> bool)."""
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_grid(items) -> list:
    """[(key, [values])] from ``KEY=V1,V2`` strings or a {key: [values]} mapping."""
    if isinstance(items, dict):
        pairs = [(k, list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in items.items()]
    else:
        pairs = []
        for item in items or ():
            key, eq, vals = str(item).partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"--grid {item!r}: write KEY=V1,V2,... (e.g. density=0.2,0.5)")
            texts = [v.strip() for v in vals.split(",")]
            if any(t == "" for t in texts):
                raise ConfigError(f"--grid {item!r}: an empty value in the list")
            pairs.append((key.strip(), [parse_value(t) for t in texts]))
    if not pairs:
        raise ConfigError("the grid is empty: give at least one --grid KEY=V1,V2,...")
    seen = set()
    for key, vals in pairs:
        if key in seen:
            raise ConfigError(f"grid key {key!r} is given twice")
        seen.add(key)
        if not vals:
            raise ConfigError(f"grid key {key!r} has no values")
        check_key(key)
    return pairs


def check_key(key: str) -> None:
    head = key.split(".")[0].split("[")[0]
    sliced = _SLICE_KEY.fullmatch(key)
    if sliced and (sliced.group(3) not in _SLICE_INPUTS or ".parameters." in key):
        return
    model = _MODEL_KEY.fullmatch(key)
    if model and (model.group(2) not in _MODEL_INPUTS or ".parameters." in key):
        return
    if key.startswith("models[") and "." in key and not model:
        # a per-model parameter written wrong, not an input
        raise ConfigError(f"grid key {key!r}: write models[I].PARAM with I a model's index "
                          f"(0 for the first), e.g. models[1].weight")
    if key.startswith("slices[") and "." in key and not sliced and \
            not _SLICE_INPUT_KEY.fullmatch(key):
        raise ConfigError(f"grid key {key!r}: write slices[I].PARAM or "
                          f"slices[I].sources[J].PARAM with I a slice's and J a source's index "
                          f"(0 for the first), e.g. slices[1].t")
    if head in INPUT_KEYS:
        raise ConfigError(f"grid key {key!r} would change the inputs; a sweep reads one set of "
                          f"inputs (sweep parameters: density, lambda, models[1].weight, "
                          f"lines.beta, merge_method, ...)")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def set_value(raw: dict, key: str, value) -> None:
    """Set grid ``key`` in a config mapping: a top-level setting, ``lines.X``, a per-model
    ``models[i].X``, else a parameter applied to every model (the global one, and each model's
    own where it sets it)."""
    m = _MODEL_KEY.fullmatch(key)
    if m:
        i, name = int(m.group(1)), m.group(2)
        models = raw.get("models")
        if "slices" in raw:
            raise ConfigError(f"grid key {key!r}: the config has no models: (it lists "
                              f"slices:; use slices[I].PARAM or slices[I].sources[J].PARAM)")
        if not isinstance(models, list) or i >= len(models):
            n = len(models) if isinstance(models, list) else 0
            raise ConfigError(f"grid key {key!r}: the config lists {_count(n, 'model')}")
        entry = models[i] if isinstance(models[i], dict) else {"model": models[i]}
        models[i] = entry
        params = entry.get("parameters") or {}
        entry["parameters"] = {**params, name: value}
        return
    if key in TOP_LEVEL:
        raw[key] = value
        return
    if key.startswith("slices[") or "slices" in raw:
        return set_slice_value(raw, key, value)
    if key.startswith("lines."):
        lines = raw.get("lines")
        raw["lines"] = {**(lines if isinstance(lines, dict) else {}), key[6:]: value}
        return
    if "." in key or "[" in key:
        raise ConfigError(f"unknown grid key {key!r}; use a parameter (density, lambda, ...), "
                          f"models[i].PARAM, lines.KEY or merge_method")
    raw["parameters"] = {**(raw.get("parameters") or {}), key: value}
    for entry in raw.get("models") or ():
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict) and \
                key in entry["parameters"]:
            entry["parameters"] = {**entry["parameters"], key: value}


def set_slice_value(raw: dict, key: str, value) -> None:
    """A grid key over a 'slices:' config: ``slices[i].PARAM`` (slice i's parameters),
    ``slices[i].sources[j].PARAM`` (that source's own), else a parameter applied everywhere
    (the top-level one, and each slice's and source's own where it sets it)."""
    m = _SLICE_KEY.fullmatch(key)
    if "slices" not in raw:
        raise ConfigError(f"grid key {key!r}: the config has no slices: (it lists models:; use "
                          f"models[I].PARAM)")
    slices = raw.get("slices") if isinstance(raw.get("slices"), list) else []
    if m:
        i, j, name = int(m.group(1)), m.group(2), m.group(3)
        if i >= len(slices) or not isinstance(slices[i], dict):
            raise ConfigError(f"grid key {key!r}: the config lists {_count(len(slices), 'slice')}")
        entry = slices[i]
        if j is not None:
            sources = entry.get("sources") if isinstance(entry.get("sources"), list) else []
            if int(j) >= len(sources) or not isinstance(sources[int(j)], dict):
                raise ConfigError(f"grid key {key!r}: slices[{i}] lists "
                                  f"{_count(len(sources), 'source')}")
            entry = sources[int(j)]
        entry["parameters"] = {**(entry.get("parameters") or {}), name: value}
        return
    if "." in key or "[" in key:
        raise ConfigError(f"unknown grid key {key!r}; over 'slices:' use a parameter (t, "
                          f"weight, ...), slices[i].PARAM, slices[i].sources[j].PARAM or "
                          f"merge_method")
    raw["parameters"] = {**(raw.get("parameters") or {}), key: value}
    entries = [sl for sl in slices if isinstance(sl, dict)]
    entries += [s for sl in entries for s in (sl.get("sources") or ()) if isinstance(s, dict)]
    for entry in entries:
        if isinstance(entry.get("parameters"), dict) and key in entry["parameters"]:
            entry["parameters"] = {**entry["parameters"], key: value}


def _label(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def point_name(values: dict) -> str:
    """``density-0.5_lambda-1``: the grid's keys and values, safe as a directory name."""
    parts = []
    for k, v in values.items():
        key = re.sub(r"models\[(\d+)\]\.", r"m\1.", k).replace("merge_method", "method")
        key = re.sub(r"slices\[(\d+)\]\.", r"s\1.", key)
        key = re.sub(r"sources\[(\d+)\]\.", r"src\1.", key)
        parts.append(f"{_label(key)}-{_label(v)}")
    return "_".join(parts)


def expand(raw: dict, grid, base_dir: Optional[Path] = None) -> list:
    """Every point of the grid's cartesian product over ``raw``, each validated like a config
    file (errors name the key and the point)."""
    if not isinstance(raw, dict):
        parse_config(raw, base_dir)   # the config's own error
    pairs = parse_grid(grid)
    points, names = [], set()
    for combo in itertools.product(*[vals for _, vals in pairs]):
        values = dict(zip([k for k, _ in pairs], combo))
        name = point_name(values)
        if name in names:
            raise ConfigError(f"grid point {name!r} appears twice (repeated values?)")
        names.add(name)
        point_raw = copy.deepcopy(raw)
        where = ", ".join(f"{k}={v}" for k, v in values.items())
        try:
            for k, v in values.items():
                set_value(point_raw, k, v)
            cfg = parse_config(point_raw, base_dir)
        except ConfigError as exc:
            raise ConfigError(f"grid point {where}: {exc}") from None
        points.append(Point(name, values, point_raw, cfg))
    return points
