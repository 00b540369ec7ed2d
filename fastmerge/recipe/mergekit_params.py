"""Configs of mergekit's own methods (fastmerge/methods/mergekit_methods.py): their parameters
as mergekit names them, read from each method's schema, and one resolved spec per tensor.

The same value syntax as every method (config.py): a number, a gradient list over block depth
or ``{filter, value}`` conditions, globally (``parameters:``) or per model for per-model
parameters. Values are checked where the config is read, so ``t: 1.5`` fails as
``parameters.t: ...``; per tensor the schema fills in defaults and checks cross-parameter rules.

mergekit's rules for an input that lacks a tensor (task_adapter.py) never apply here: every
input holds every tensor (inputs.py checks it before a weight is read).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..methods import MethodInfo
from ..methods.mergekit_methods import MERGEKIT_METHODS
from ..methods.schema import REQUIRED


def is_mergekit_method(name) -> bool:
    return isinstance(name, str) and name in MERGEKIT_METHODS


def info(name: str) -> MethodInfo:
    """The MethodInfo the shared pipeline code reads (base, second moments, paper)."""
    schema = MERGEKIT_METHODS[name].schema
    return MethodInfo("none", "mergekit", False, None,
                      needs_base=schema.base == "required", paper=schema.paper or "mergekit")


def allowed(name: str, per_model: bool) -> dict:
    """Parameter name -> Param a config may set globally or (``per_model``) per model."""
    m = MERGEKIT_METHODS[name]
    out = {p.name: p for p in m.schema.params if not per_model or p.scope != "global"}
    if m.schema.random and not per_model:
        out["seed"] = None          # fastmerge's seed of the counter-based draws
    return out


def check_value(method: str, where: str, key: str, value) -> None:
    """One leaf value (a scalar, a gradient element or a condition's value) of ``key``."""
    p = allowed(method, False).get(key) or allowed(method, True).get(key)
    if p is None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: must be a non-negative integer, got {value!r}")
        return
    try:
        p.check(method, key, value)
    except ValueError as exc:
        raise ValueError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None


def check_leaves(method: str, where: str, key: str, setting) -> None:
    """Every value in a setting config.py accepted as to its shape (scalar, gradient or
    conditions) checked against the parameter's domain."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        if setting is None:
            raise ValueError(f"{where}: no value given")
        return check_value(method, where, key, setting)
    for i, e in enumerate(setting):
        if isinstance(e, dict):
            check_leaves(method, f"{where}[{i}].value", key, e["value"])
        else:
            check_value(method, f"{where}[{i}]", key, e)


def check_inputs(method: str, has_base: bool, n_models: int) -> None:
    """The model counts and base the method needs, one line naming the key."""
    schema = MERGEKIT_METHODS[method].schema
    try:
        schema.check_inputs(has_base, n_models)
    except ValueError as exc:
        key = "base_model" if "base_model" in str(exc) else "models"
        raise ValueError(f"{key}: merge_method {exc}") from None


@dataclass(frozen=True)
class MergekitSpec:
    """One tensor's resolved parameters for a mergekit method (every default filled in).
    The class attributes answer what the shared pipeline code asks of a MergeSpec."""
    method: str
    n_models: int
    params: dict = field(hash=False)
    seed: int = 0
    sparsifier = "none"
    combine = "mergekit"
    rescale = None
    score = "magnitude"
    ota_normalize = None
    lines_factor = 1.0

    def to_dict(self) -> dict:
        d = {"method": self.method, "n_models": self.n_models}
        d.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()})
        if MERGEKIT_METHODS[self.method].schema.random:
            d["seed"] = self.seed
        return d


def resolve(method: str, n_models: int, value, seed: Optional[int]) -> MergekitSpec:
    """The spec of one tensor: ``value(key, per_model_index)`` gives the evaluated setting of a
    parameter (None: not set), the model's own first, then the global one."""
    schema = MERGEKIT_METHODS[method].schema
    params = {}
    for p in schema.params:
        if p.scope == "global":
            v = value(p.name, None)
        else:
            vals = [value(p.name, i) for i in range(n_models)]
            v = None if all(x is None for x in vals) else \
                [p.default if x is None else x for x in vals]
            if v is not None and any(x is REQUIRED for x in v):
                missing = next(i for i, x in enumerate(v) if x is REQUIRED)
                raise ValueError(f"{method}: parameter {p.name!r} is required for "
                                 f"models[{missing}]")
        if v is not None:
            params[p.name] = v
    resolved = schema.resolve(params, n_models)
    if seed is None:
        seed = value("seed", None) if schema.random else None
    return MergekitSpec(method, n_models, resolved, int(seed or 0))
