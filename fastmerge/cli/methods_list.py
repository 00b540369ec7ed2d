"""``fastmerge methods``: every merge method with its parameters, defaults and domains, read
from the registries (fastmerge.methods.METHODS and the mergekit methods' schemas)."""
from __future__ import annotations

from ..methods import ALIASES, METHODS
from ..methods.mergekit_methods import MERGEKIT_METHODS
from ..methods.schema import REQUIRED, Param


def _domain(p: Param) -> str:
    if p.kind is bool:
        return "true|false"
    lo = None if p.lo is None else f"{'(' if p.open_lo else '['}{p.lo:g}"
    hi = None if p.hi is None else f"{p.hi:g}{')' if p.open_hi else ']'}"
    if lo and hi:
        return f"{lo}, {hi}"
    if lo:
        return f"{'>' if p.open_lo else '>='} {p.lo:g}"
    if hi:
        return f"{'<' if p.open_hi else '<='} {p.hi:g}"
    return "integer" if p.kind is int else "number"


def _row(name: str, scope: str, default, domain: str, doc: str = "") -> str:
    default = "required" if default is REQUIRED else ("none" if default is None else default)
    return f"    {name:<18} {scope:<10} default {str(default):<9} {domain:<12} {doc}".rstrip()


def _fastmerge_rows(info) -> list[str]:
    rows = [_row("weight", "per model", 1.0, "number")]
    if info.sparsifier != "none":
        rows.append(_row("density", "per model", info.density, "[0, 1]"))
    if info.sparsifier == "band":
        rows.append(_row("gamma", "per model", 0.01, "[0, 1]", "share of the largest dropped"))
    if info.combine != "linear":
        rows.append(_row("lambda", "global", 1.0, "number", "scale of the merged task vector"))
    rows.append(_row("normalize", "global", info.normalize, "true|false|count"))
    if info.sparsifier != "none":
        rows.append(_row("rescale", "global", info.rescale, "l1|inverse_density|none"))
    if info.sparsifier == "dare":
        rows.append(_row("seed", "global", 0, ">= 0", "keys the counter-based draws"))
    if info.combine in ("ties", "consensus_ties"):
        rows.append(_row("election", "global", "sum", "sum|count"))
    if info.combine.startswith("consensus"):
        rows += [_row("consensus_lambda", "per model", 0.6, ">= 0"),
                 _row("consensus_k", "global", 2, ">= 0")]
    if info.needs_second_moments:
        rows.append(_row("power", "global", 0.5, "number", "preconditioner_path per model"))
    return rows


def describe_methods() -> str:
    lines = ["fastmerge's methods (task-vector engine):"]
    for name, info in METHODS.items():
        alias = [a for a, m in ALIASES.items() if m == name]
        lines.append(f"  {name}{' (alias ' + ', '.join(alias) + ')' if alias else ''}"
                     f"  base: {'required' if info.needs_base else 'none'}  {info.paper}")
        lines += _fastmerge_rows(info)
    lines.append("mergekit's own methods (reductions + per-element pass):")
    for name, m in MERGEKIT_METHODS.items():
        s = m.schema
        count = f"{s.min_models}+" if s.max_models is None else (
            str(s.min_models) if s.min_models == s.max_models else
            f"{s.min_models}-{s.max_models}")
        route = "fused weighted sum" if _linear(m) else "reference through torch"
        lines.append(f"  {name}  base: {s.base}  models: {count}  runs as: {route}"
                     f"{'  ' + s.paper if s.paper else ''}")
        lines += [_row(p.name, p.scope.replace("_", " "), p.default, _domain(p), p.doc)
                  for p in s.params] or ["    (no parameters)"]
        if s.random:
            lines.append(_row("seed", "global", 0, ">= 0", "keys the counter-based draws"))
    return "\n".join(lines)


def _linear(method) -> bool:
    """Whether the method's default job is one linear combination per tensor."""
    from ..methods.core import Job
    n = max(2, method.schema.min_models)
    if method.schema.max_models is not None:
        n = min(n, method.schema.max_models)
    try:
        job = Job((4, 4), method.schema.resolve(_stand_ins(method), n), "t", 0, True, n)
        return method.combination(job) is not None
    except (KeyError, TypeError, ValueError):
        return False


def _stand_ins(method) -> dict:
    """Values for the required parameters, only to ask ``combination`` what it does."""
    out = {}
    for p in method.schema.params:
        if p.default is REQUIRED:
            out[p.name] = 0.5 if p.kind is float else 1
    return out
