"""Make mergekit's own pipeline compute its per-tensor merge math with fastmerge.

Usage::

    import fastmerge.integrations.mergekit as fm_mk
    fm_mk.install()                 # process-wide, until fm_mk.uninstall()
    with fm_mk.patched():           # or for a block only
        mergekit.merge.run_merge(...)

    # mergekit's CLI with the patch installed (FASTMERGE_MERGEKIT=0 runs stock mergekit):
    python -m fastmerge.integrations.mergekit config.yml ./out [mergekit-yaml options]

mergekit keeps everything it owns: config parsing and parameter resolution (per-layer
gradients, filters, defaults per method), the task graph, lazy loading, device placement,
dtype handling (``dtype`` / ``out_dtype``), tokenizer and output writing. Only the arithmetic
of one output tensor changes hands, at two seams of mergekit 0.1.5:

- ``GeneralizedTaskArithmeticMerge.merge_group(group, **parameters)``: receives the base and
  model tensors of one weight (already cast to mergekit's working dtype) and mergekit's
  resolved parameters (per-model ``weight``/``density``/``gamma``, shared ``normalize``,
  ``rescale``, ``lambda``, ``int8_mask``). Covers task_arithmetic, ties, dare_ties,
  dare_linear, breadcrumbs, breadcrumbs_ties (and any other instance whose sparsifier is
  magnitude / random / magnitude_outliers / none). della and della_linear
  (``della_magprune``) take the next seam.
- the ``implementation`` of mergekit's registered ``linear`` method (a batched kernel over
  ``TensorBatch`` rows).
- the ``implementation`` of every other registered method fastmerge implements
  (fastmerge/methods/mergekit_methods.py: slerp, nuslerp, multislerp, karcher, model_stock,
  sce, nearswap, arcee_fusion, ram, ramplus_tl, passthrough) and della / della_linear's
  ``merge_group``: ``merge_tensors(..., parameters=...)``, the fused weighted sum where the
  method is one linear combination per tensor, della's fused kernel, the method's float32
  reference otherwise. della's draws
  are fastmerge's (same seed as DARE below), so they match mergekit in distribution.

Anything fastmerge does not accept (float64 working dtype, density/gamma outside [0, 1],
integer tensors, a weight sum within mergekit's 1e-8 guard, ...) also falls back to mergekit's
own code for that tensor, so the patch never makes a merge fail that mergekit would run.

Deliberate differences from stock mergekit (docs/integrations.md): task vectors and every sum
in float32 (mergekit: the working dtype, bf16 for bf16 checkpoints); elements whose magnitude
equals the top-k threshold are all kept (mergekit's argsort keeps an arbitrary subset); the
DARE mask is fastmerge's counter-based Philox mask keyed by (seed, tensor name, model index),
with seed = ``torch.initial_seed()`` at merge time (mergekit's ``--random-seed`` sets it) unless
``install(seed=...)`` or ``FASTMERGE_SEED`` says otherwise.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections import Counter
from typing import Any, Optional, Sequence

import torch

log = logging.getLogger("fastmerge.integrations.mergekit")

#: mergekit versions whose seams this module was written against and tested with.
SUPPORTED_VERSIONS = ("0.1.5",)
#: set to 1 to install the patch on an untested mergekit version anyway (the structural
#: checks still run).
FORCE_ENV = "FASTMERGE_MERGEKIT_FORCE"
#: main(): 0/false/no runs stock mergekit (for A/B comparisons); anything else, or unset,
#: installs the patch.
ENABLE_ENV = "FASTMERGE_MERGEKIT"
SEED_ENV = "FASTMERGE_SEED"

# mergekit method -> fastmerge method, from (sparsification_method, consensus_method).
_SPARSIFIERS = {None: "none", "magnitude": "topk", "random": "dare",
                "magnitude_outliers": "band"}
_METHOD_FOR = {
    ("none", False): "task_arithmetic", ("none", True): "ties",
    ("topk", False): "magnitude_prune", ("topk", True): "ties",
    ("dare", False): "dare_linear", ("dare", True): "dare_ties",
    ("band", False): "breadcrumbs", ("band", True): "breadcrumbs_ties",
}
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class MergekitVersionError(RuntimeError):
    """The installed mergekit is not one whose seams this integration knows."""


class _State:
    lock = threading.RLock()
    installed = False
    backend = "auto"
    seed: Optional[int] = None
    orig_merge_group = None
    orig_linear_impl = None
    linear_method = None
    orig_impls: dict = {}           # mergekit method name -> its own implementation
    stats: Counter = Counter()      # "fastmerge:<method>" / "fallback:<reason>" -> tensors
    backends_used: set = set()      # resolved fastmerge backend names


def mergekit_version() -> Optional[str]:
    try:
        from importlib.metadata import version
        return version("mergekit")
    except Exception:  # noqa: BLE001 - not installed, or installed without metadata
        try:
            import mergekit
            return getattr(mergekit, "__version__", None)
        except ImportError:
            return None


def check_version(strict: bool = True) -> str:
    """Return the installed mergekit version; raise MergekitVersionError (clear message) if
    mergekit is missing or, when ``strict``, not a supported version (``FASTMERGE_MERGEKIT_FORCE=1``
    lifts the version check, never the structural one)."""
    from . import check_supported
    return check_supported("mergekit", mergekit_version(), SUPPORTED_VERSIONS, FORCE_ENV,
                           MergekitVersionError, "pip install mergekit==0.1.5", strict,
                           "Its merge seams may differ (structural checks apply even when "
                           "forced). ")


def _seams():
    """mergekit's classes/objects we patch, with a structural check of each."""
    from mergekit.merge_methods import generalized_task_arithmetic as gta
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import BatchedMergeMethod
    cls = getattr(gta, "GeneralizedTaskArithmeticMerge", None)
    problems = []
    if cls is None or not callable(getattr(cls, "merge_group", None)):
        problems.append("GeneralizedTaskArithmeticMerge.merge_group not found")
    else:
        fields = getattr(cls, "__dataclass_fields__", {})
        for f in ("sparsification_method", "consensus_method"):
            if f not in fields:
                problems.append(f"GeneralizedTaskArithmeticMerge has no field {f!r}")
    try:
        linear = registry.get("linear")
    except Exception as e:  # noqa: BLE001
        linear = None
        problems.append(f"registry.get('linear') failed: {e}")
    if linear is not None and not (isinstance(linear, BatchedMergeMethod)
                                   and callable(getattr(linear, "implementation", None))):
        problems.append("mergekit's 'linear' is not a BatchedMergeMethod with an implementation")
    if problems:
        raise MergekitVersionError(f"mergekit {mergekit_version()} does not have the seams "
                                   f"fastmerge patches: {'; '.join(problems)}")
    return cls, linear


# ----------------------------------------------------------------------------- mapping

def _enum_value(x) -> Optional[str]:
    return None if x is None else getattr(x, "value", str(x))


def fastmerge_method_for(gta_method) -> Optional[str]:
    """The fastmerge method computing a GeneralizedTaskArithmeticMerge instance, or None."""
    sp = _SPARSIFIERS.get(_enum_value(gta_method.sparsification_method), None)
    if sp is None:
        return None
    return _METHOD_FOR[(sp, gta_method.consensus_method is not None)]


def resolve_gta_parameters(gta_method, weights: Sequence[float], parameters: dict,
                           entry_ids: Sequence[Any], numel: Optional[int] = None
                           ) -> tuple[Optional[str], dict, str]:
    """Translate mergekit's resolved parameters for one tensor (``numel`` elements) into
    merge_tensors arguments.

    Returns (fastmerge method or None, kwargs, reason for a fallback)."""
    method = fastmerge_method_for(gta_method)
    if method is None:
        return None, {}, f"sparsification {_enum_value(gta_method.sparsification_method)}"
    sp = _SPARSIFIERS[_enum_value(gta_method.sparsification_method)]
    kw: dict = dict(weights=list(weights), lambda_=float(parameters["lambda"]),
                    normalize=bool(parameters["normalize"]))
    if sp != "none":
        dens = [float(parameters["density"][i]) for i in entry_ids]
        if any(not (0.0 <= d <= 1.0) or d != d for d in dens):
            return None, {}, "density outside [0, 1]"
        kw["density"] = dens
        # mergekit's rescale: true is L1 matching, applied by its sparsifier only
        kw["rescale"] = "l1" if parameters["rescale"] else None
    else:
        kw["rescale"] = None  # task_arithmetic: mergekit never sparsifies, density is ignored
    if sp == "band":
        gam = [float(parameters["gamma"][i]) for i in entry_ids] if "gamma" in parameters \
            else [0.01] * len(entry_ids)
        if any(not (0.0 <= g <= 1.0) for g in gam):
            return None, {}, "gamma outside [0, 1]"
        kw["gamma"] = gam
        if numel is not None:
            # mergekit's magnitude_outliers keeps int(d n) elements, none when that is 0
            # (fastmerge's band keeps max(1, floor(d n))): match mergekit
            kw["density"] = [0.0 if d < 1.0 and int(d * numel) == 0 else d for d in dens]
    if gta_method.consensus_method is not None:
        kw["election"] = _enum_value(gta_method.consensus_method)
        if kw["election"] not in ("sum", "count"):
            return None, {}, f"consensus {kw['election']}"
    elif kw["normalize"] and 0 < abs(sum(weights)) < 1e-8:
        # mergekit treats |sum w| < 1e-8 as 0 (divide by 1); fastmerge only exact 0
        return None, {}, "weight sum inside mergekit's 1e-8 guard"
    return method, kw, ""


def _current_seed() -> int:
    if _State.seed is not None:
        return _State.seed
    env = os.environ.get(SEED_ENV)
    if env:
        return int(env) % 2 ** 64
    return int(torch.initial_seed()) % 2 ** 64


# ----------------------------------------------------------------------------- patched seams

def _resolve_backend(device) -> str:
    """The concrete fastmerge backend for ``device`` ("auto" resolved), recorded in stats."""
    from fastmerge.backends import get_backend
    name = get_backend(_State.backend, device).name
    _State.backends_used.add(name)
    return name


def _gta_merge_group(self, group, /, **parameters):
    """fastmerge's replacement of GeneralizedTaskArithmeticMerge.merge_group."""
    from fastmerge.api import merge_tensors
    orig = _State.orig_merge_group
    base_entry = group.base
    entries = group.non_base
    if base_entry is None or not entries:
        return orig(self, group, **parameters)
    tensors = [base_entry.tensor] + [e.tensor for e in entries]
    if any(t.dtype not in _FLOAT_DTYPES for t in tensors):
        _State.stats[f"fallback:dtype {tensors[0].dtype}"] += 1
        return orig(self, group, **parameters)
    if _mergekit_method(self.method_name) is not None:   # della, della_linear
        return _group_impl(self.method_name, lambda g, **kw: orig(self, g, **kw))(
            group, **parameters)
    ids = [e.id for e in entries]
    weights = [float(parameters["weight"][i]) for i in ids]
    method, kw, why = resolve_gta_parameters(self, weights, parameters, ids,
                                             base_entry.tensor.numel())
    if method is None:
        _State.stats[f"fallback:{self.method_name}: {why}"] += 1
        return orig(self, group, **parameters)
    base = base_entry.tensor
    name = group.metadata.name or ""
    if method in ("dare_linear", "dare_ties"):
        kw["seed"] = _current_seed()
    out = merge_tensors(base, [e.tensor for e in entries], method, tensor_name=name,
                        backend=_resolve_backend(base.device), out_dtype=base.dtype, **kw)
    _State.stats[f"fastmerge:{self.method_name}"] += 1
    return out


def _linear_impl(batch, weight, normalize: bool = True):
    """fastmerge's replacement of mergekit's linear kernel (same signature)."""
    from fastmerge.api import merge_tensors
    first = batch.tensors[0]
    w = weight.detach().to(torch.float64).cpu()
    if first.dtype not in _FLOAT_DTYPES or (normalize and bool((w.sum(1) == 0).any())):
        _State.stats["fallback:linear"] += 1
        return _State.orig_linear_impl(batch, weight, normalize=normalize)
    out = torch.empty_like(first)
    be = _resolve_backend(first.device)
    for g in range(first.shape[0]):
        out[g] = merge_tensors(None, [t[g] for t in batch.tensors], "linear",
                               weights=w[g].tolist(), normalize=bool(normalize),
                               backend=be, out_dtype=first.dtype)
    _State.stats["fastmerge:linear"] += first.shape[0]
    return out


def _mergekit_method(name):
    from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
    return MERGEKIT_METHODS.get(name)


def _per_model(value, entries):
    """mergekit's per-input values (a mapping by input id) as one value per entry."""
    if hasattr(value, "values_for"):
        return value.values_for(entries)
    if isinstance(value, dict):
        return [value[e.id] for e in entries]
    return value


def _fastmerge_params(name: str, parameters: dict, entries) -> dict:
    schema = _mergekit_method(name).schema
    known = {p.name for p in schema.params}
    return {k: _per_model(v, entries) for k, v in parameters.items() if k in known}


def _merge_one(name, base, models, params, tensor_name):
    from fastmerge.api import merge_tensors
    ref = base if base is not None else models[0]
    seed = _current_seed() if _mergekit_method(name).schema.random else None
    return merge_tensors(base, models, name, parameters=params, tensor_name=tensor_name,
                         seed=seed, backend=_resolve_backend(ref.device), out_dtype=ref.dtype)


def _group_impl(name: str, orig):
    """fastmerge's implementation of a TensorGroup method (mergekit's signature)."""
    def impl(group, /, **parameters):
        base = group.base.tensor if group.base is not None else None
        entries = list(group.non_base)
        models = [e.tensor for e in entries]
        if not models or any(t.dtype not in _FLOAT_DTYPES for t in [*models] +
                             ([base] if base is not None else [])):
            _State.stats[f"fallback:{name}"] += 1
            return orig(group, **parameters)
        try:
            out = _merge_one(name, base, models, _fastmerge_params(name, parameters, entries),
                             getattr(group.metadata, "name", None) or "")
        except ValueError as exc:   # outside fastmerge's domain: mergekit decides
            _State.stats[f"fallback:{name}: {exc}"] += 1
            return orig(group, **parameters)
        _State.stats[f"fastmerge:{name}"] += 1
        return out
    impl.__fastmerge_patch__ = True
    return impl


def _batch_impl(name: str, orig):
    """fastmerge's implementation of a TensorBatch method (rows merged one by one)."""
    def impl(batch, /, **parameters):
        first = batch.tensors[0]
        bi = batch.base_index
        if first.dtype not in _FLOAT_DTYPES:
            _State.stats[f"fallback:{name}"] += 1
            return orig(batch, **parameters)
        others = [i for i in range(len(batch.tensors)) if i != bi]
        out = torch.empty_like(first)
        try:
            for g in range(first.shape[0]):
                params = {}
                for k, v in parameters.items():
                    v = v[g] if isinstance(v, torch.Tensor) and v.ndim > 0 else v
                    if isinstance(v, torch.Tensor):   # per input: the non-base ones
                        v = [float(v[i]) for i in others] if v.ndim else float(v)
                    params[k] = v
                params = {k: v for k, v in params.items()
                          if k in {p.name for p in _mergekit_method(name).schema.params}}
                out[g] = _merge_one(name, None if bi is None else batch.tensors[bi][g],
                                    [batch.tensors[i][g] for i in others], params, "")
        except ValueError as exc:
            _State.stats[f"fallback:{name}: {exc}"] += 1
            return orig(batch, **parameters)
        _State.stats[f"fastmerge:{name}"] += first.shape[0]
        return out
    impl.__fastmerge_patch__ = True
    return impl


def _method_seams() -> dict:
    """mergekit's registered methods fastmerge implements: name -> (method, batched)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import BatchedMergeMethod

    from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
    out = {}
    for name in MERGEKIT_METHODS:
        try:
            m = registry.get(name)
        except Exception:  # noqa: BLE001 - not registered in this mergekit
            continue
        if callable(getattr(m, "implementation", None)):
            out[name] = (m, isinstance(m, BatchedMergeMethod))
    return out


_gta_merge_group.__fastmerge_patch__ = True
_linear_impl.__fastmerge_patch__ = True


# ----------------------------------------------------------------------------- install

def install(backend: str = "auto", seed: Optional[int] = None, strict_version: bool = True) -> None:
    """Route mergekit's per-tensor math for the covered methods through fastmerge.

    backend: fastmerge backend name ("auto" honours FASTMERGE_BACKEND); seed: the DARE seed
    (default: FASTMERGE_SEED, else torch.initial_seed() when each tensor merges, which
    mergekit's --random-seed sets). Idempotent; ``uninstall()`` restores mergekit."""
    check_version(strict_version)
    cls, linear = _seams()
    with _State.lock:
        _State.backend = backend
        _State.seed = None if seed is None else int(seed) % 2 ** 64
        if _State.installed:
            return
        _State.orig_merge_group = cls.__dict__["merge_group"]
        _State.linear_method = linear
        _State.orig_linear_impl = linear.implementation
        cls.merge_group = _gta_merge_group
        linear.implementation = _linear_impl
        for name, (m, batched) in _method_seams().items():
            _State.orig_impls[name] = (m, m.implementation)
            m.implementation = (_batch_impl if batched else _group_impl)(name, m.implementation)
        _State.installed = True
    log.info("fastmerge patched mergekit %s (backend=%s)", mergekit_version(), backend)


def uninstall() -> None:
    """Restore mergekit's own code."""
    with _State.lock:
        if not _State.installed:
            return
        from mergekit.merge_methods.generalized_task_arithmetic import (
            GeneralizedTaskArithmeticMerge,
        )
        GeneralizedTaskArithmeticMerge.merge_group = _State.orig_merge_group
        _State.linear_method.implementation = _State.orig_linear_impl
        for m, impl in _State.orig_impls.values():
            m.implementation = impl
        _State.orig_impls.clear()
        _State.installed = False


def is_installed() -> bool:
    return _State.installed


def stats() -> dict:
    """Tensors merged by fastmerge / by mergekit's fallback since the last reset_stats()."""
    return dict(_State.stats)


def backends_used() -> list:
    return sorted(_State.backends_used)


def reset_stats() -> None:
    _State.stats.clear()
    _State.backends_used.clear()


@contextlib.contextmanager
def patched(backend: str = "auto", seed: Optional[int] = None, strict_version: bool = True):
    """Context manager: the patch is installed inside the block (restored after, unless it was
    already installed before the block)."""
    from . import installed_within
    with installed_within(_State, ("backend", "seed"),
                          lambda: install(backend=backend, seed=seed,
                                          strict_version=strict_version), uninstall):
        yield


def _enabled_by_env() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _out_path(command, argv) -> Optional[str]:
    """OUT_PATH as mergekit-yaml's own click parser reads it from argv (None if it cannot)."""
    try:
        ctx = command.make_context("mergekit-yaml", list(argv), resilient_parsing=True)
        return ctx.params.get("out_path")
    except Exception:  # noqa: BLE001 - --help, usage errors: nothing was written
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """mergekit's own ``mergekit-yaml`` CLI (mergekit.scripts.run_yaml.main, same arguments and
    options) with the fastmerge patch installed, unless FASTMERGE_MERGEKIT=0. Writes
    ``fastmerge_integration.json`` (what was merged by whom) next to the output."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml
    argv = list(sys.argv[1:] if argv is None else argv)
    enabled = _enabled_by_env()
    reset_stats()
    ctx = patched(backend=os.environ.get("FASTMERGE_BACKEND", "auto")) if enabled \
        else contextlib.nullcontext()
    with ctx:
        try:
            mergekit_yaml.main(args=argv, prog_name="mergekit-yaml (fastmerge)",
                               standalone_mode=False)
            rc = 0
        except SystemExit as e:  # click's --help / usage errors
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # noqa: BLE001 - click errors: print like click does
            import click
            if isinstance(e, click.exceptions.ClickException):
                e.show()
                return e.exit_code
            if isinstance(e, click.exceptions.Abort):
                return 1
            raise
    out_path = _out_path(mergekit_yaml, argv)
    if rc == 0 and out_path and os.path.isdir(out_path):
        from fastmerge import __version__
        record = {"fastmerge": __version__, "mergekit": mergekit_version(),
                  "patched": enabled, "backend": os.environ.get("FASTMERGE_BACKEND", "auto"),
                  "backends_used": backends_used(),
                  "dare_seed": _current_seed() if enabled else None, "tensors": stats()}
        with open(os.path.join(out_path, "fastmerge_integration.json"), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
