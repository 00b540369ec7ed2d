"""Parameter schemas of mergekit's own methods: names, defaults, domains and scopes.

A schema resolves the user's parameters for one tensor into a plain dict: every default filled
in, every value checked, per-model values expanded to one tuple entry per non-base model (or
per input for ``input`` scope). Errors are one line naming the method and the parameter.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

REQUIRED = object()  # the default of a parameter the user must give
SCOPES = ("global", "per_model", "per_input")  # per_model: each non-base model
BASES = ("required", "optional", "input", "ignored")  # "input": the base is one more input


@dataclass(frozen=True)
class Param:
    name: str
    kind: type                       # float, int or bool
    default: Any = REQUIRED
    scope: str = "global"
    lo: float | None = None       # inclusive bounds, unless open_lo / open_hi
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    nullable: bool = False           # None is a valid value (passthrough's scale)
    doc: str = ""

    def check(self, method: str, label: str, value: Any) -> Any:
        """The validated value of this parameter (``label`` names it in errors)."""
        where = f"{method}: {label}"
        if value is None and self.nullable:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where} must be finite, got {value!r}")
        if self.kind is int and int(value) != value:
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            raise ValueError(f"{where} must be {'>' if self.open_lo else '>='} {self.lo}, "
                             f"got {value!r}")
        if self.hi is not None and (value >= self.hi if self.open_hi else value > self.hi):
            raise ValueError(f"{where} must be {'<' if self.open_hi else '<='} {self.hi}, "
                             f"got {value!r}")
        return self.kind(value)


@dataclass(frozen=True)
class MethodSchema:
    """What a method takes: its parameters and how many inputs (base and non-base) it needs."""
    name: str
    params: tuple[Param, ...]
    base: str                          # one of BASES
    min_models: int = 1                # non-base models (all inputs when base is "input")
    max_models: int | None = None
    random: bool = False               # draws from fastmerge.methods.rng (needs seed, tensor name)
    paper: str = ""
    check: Callable[[dict, int], None] | None = None  # cross-parameter rules

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def check_inputs(self, has_base: bool, n_models: int) -> None:
        """One line naming what is missing or too many, per the method's input contract."""
        if self.base == "required" and not has_base:
            raise ValueError(f"{self.name} needs a base_model")
        n = n_models + (1 if has_base and self.base == "input" else 0)
        what = "inputs" if self.base in ("input", "ignored") else "models besides the base"
        if n < self.min_models:
            raise ValueError(f"{self.name} needs at least {self.min_models} {what}, got {n}")
        if self.max_models is not None and n > self.max_models:
            raise ValueError(f"{self.name} takes at most {self.max_models} {what}, got {n}")

    def resolve(self, params: Mapping[str, Any] | None, n_models: int) -> dict:
        """Defaults filled in and values checked; per-model values become ``n_models`` tuples."""
        params = dict(params or {})
        unknown = sorted(set(params) - {p.name for p in self.params})
        if unknown:
            allowed = ", ".join(p.name for p in self.params) or "none"
            raise ValueError(f"{self.name}: unknown parameter {unknown[0]!r} "
                             f"(parameters: {allowed})")
        out = {}
        for p in self.params:
            value = params.get(p.name, p.default)
            if value is REQUIRED:
                raise ValueError(f"{self.name}: parameter {p.name!r} is required")
            if p.scope == "global":
                out[p.name] = p.check(self.name, p.name, value)
                continue
            if isinstance(value, (list, tuple)):
                if len(value) != n_models:
                    raise ValueError(f"{self.name}: {p.name} has {len(value)} entries but "
                                     f"there are {n_models} models")
                out[p.name] = tuple(p.check(self.name, f"{p.name}[{i}]", v)
                                    for i, v in enumerate(value))
            else:
                out[p.name] = (p.check(self.name, p.name, value),) * n_models
        if self.check is not None:
            self.check(out, n_models)
        return out

    def describe(self) -> list[dict]:
        """One row per parameter, for ``fastmerge methods``."""
        return [{"name": p.name, "scope": p.scope,
                 "default": "required" if p.default is REQUIRED else p.default,
                 "doc": p.doc} for p in self.params]
