"""peft's merge functions computed by fastmerge, and a patch for ``add_weighted_adapter``.

The five functions below have the signatures of ``peft.utils.merge_utils`` (peft 0.21) and
peft's semantics: the inputs are task tensors (no base), ``weights`` is a 1-D tensor, TIES
elects signs on the *unweighted* sparsified tensors and divides by the number of agreeing
models (fastmerge ``elect_on="unweighted", normalize="count"``), magnitude pruning keeps
``k = int(density * n)`` elements (0 when that is 0), DARE rescales by ``1/density``,
``majority_sign_method`` "total" / "frequency" is fastmerge's election "sum" / "count", and the
result has the dtype peft's arithmetic gives (task dtype promoted with the weights' dtype).

Usage::

    import fastmerge.integrations.peft as fm_peft
    fm_peft.ties(task_tensors, weights, density)          # direct use
    with fm_peft.patched():                               # add_weighted_adapter uses fastmerge
        model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="ties",
                                   density=0.5)

Deliberate differences (docs/integrations.md): elements whose magnitude equals the top-k
threshold are all kept (``torch.topk`` keeps an arbitrary subset of equals); task tensors
are merged in float32 whatever their dtype; the DARE mask is fastmerge's counter-based mask
(seed drawn from torch's global RNG per call, so ``torch.manual_seed`` still makes runs
repeatable; ``install(seed=...)`` uses a private generator instead); ``density == 0`` for DARE
gives zeros (peft divides by zero). Inputs fastmerge does not take (float64, integer tensors)
run peft's own function.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from typing import Literal, Optional

import torch

SUPPORTED_VERSIONS = ("0.21.2",)
FORCE_ENV = "FASTMERGE_PEFT_FORCE"
NAMES = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SIGN_METHODS = {"total": "sum", "frequency": "count"}


class PeftVersionError(RuntimeError):
    """The installed peft is not one whose merge functions this integration knows."""


class _State:
    lock = threading.RLock()
    installed = False
    backend = "auto"
    generator: Optional[torch.Generator] = None
    patched: list = []          # (module, name, original)
    originals: Optional[dict] = None
    calls: dict = {n: 0 for n in NAMES}


def peft_version() -> Optional[str]:
    try:
        from importlib.metadata import version
        return version("peft")
    except Exception:  # noqa: BLE001
        return None


def originals() -> dict:
    """peft's own merge functions (unpatched), by name."""
    with _State.lock:
        if _State.originals is None:
            from peft.utils import merge_utils
            found = {n: getattr(merge_utils, n) for n in NAMES}
            if any(getattr(f, "__fastmerge_patch__", False) for f in found.values()):
                raise RuntimeError("peft.utils.merge_utils is patched by someone else")
            _State.originals = found
        return dict(_State.originals)


# ----------------------------------------------------------------------------- helpers

def _weights_list(weights, n: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        w = weights.detach().reshape(-1).to(torch.float64).cpu().tolist()
    else:
        w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries but there are {n} task tensors")
    return w


def _out_dtype(task_tensors, weights) -> torch.dtype:
    dt = task_tensors[0].dtype
    for t in task_tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    if isinstance(weights, torch.Tensor):
        dt = torch.promote_types(dt, weights.dtype)
    return dt


def _supported(task_tensors, weights) -> bool:
    if not isinstance(task_tensors, (list, tuple)) or not task_tensors:
        return False
    if any(not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES for t in task_tensors):
        return False
    return _out_dtype(task_tensors, weights) in _FLOAT_DTYPES


def _peft_density(density: float, n: int) -> float:
    """peft's magnitude pruning keeps int(density * n) elements (no minimum of one)."""
    if density is None:
        raise ValueError("density is required")
    density = _dare_density(density)
    return 0.0 if density < 1 and int(density * n) == 0 else density


def _dare_density(density: float) -> float:
    density = float(density)
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be "
                      f"performed.")
        return 1.0
    return density


def _draw_seed() -> int:
    g = _State.generator
    return int(torch.randint(0, 2 ** 62, (1,), generator=g).item())


def _merge(name, task_tensors, weights, method, **kw):
    from fastmerge.api import merge_tensors
    _State.calls[name] += 1
    return merge_tensors(None, list(task_tensors), method,
                         weights=_weights_list(weights, len(task_tensors)),
                         backend=_State.backend,
                         out_dtype=_out_dtype(task_tensors, weights), **kw)


def _sign_method(majority_sign_method: str) -> str:
    if majority_sign_method not in _SIGN_METHODS:
        raise RuntimeError(f'Unimplemented mask method "{majority_sign_method}"')
    return _SIGN_METHODS[majority_sign_method]


# ----------------------------------------------------------------------------- peft's API

def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i t_i (peft.utils.merge_utils.task_arithmetic)."""
    if not _supported(task_tensors, weights):
        return originals()["task_arithmetic"](task_tensors, weights)
    return _merge("task_arithmetic", task_tensors, weights, "task_arithmetic")


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor,
                    density: float) -> torch.Tensor:
    """sum_i w_i topk(t_i) (peft.utils.merge_utils.magnitude_prune)."""
    if not _supported(task_tensors, weights):
        return originals()["magnitude_prune"](task_tensors, weights, density)
    d = _peft_density(density, task_tensors[0].numel())
    return _merge("magnitude_prune", task_tensors, weights, "magnitude_prune", density=d)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """peft's TIES: elect on the unweighted pruned tensors, divide by the agreeing count."""
    if not _supported(task_tensors, weights):
        return originals()["ties"](task_tensors, weights, density, majority_sign_method)
    d = _peft_density(density, task_tensors[0].numel())
    return _merge("ties", task_tensors, weights, "ties", density=d,
                  election=_sign_method(majority_sign_method), elect_on="unweighted",
                  normalize="count", rescale=None)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor,
                density: float) -> torch.Tensor:
    """sum_i w_i dare(t_i) with 1/density rescale (peft.utils.merge_utils.dare_linear)."""
    if not _supported(task_tensors, weights):
        return originals()["dare_linear"](task_tensors, weights, density)
    d = _dare_density(density)
    return _merge("dare_linear", task_tensors, weights, "dare_linear", density=d,
                  rescale="inverse_density", normalize=False, seed=_draw_seed())


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """peft's DARE-TIES: random prune with 1/density rescale, then peft's TIES combine."""
    if not _supported(task_tensors, weights):
        return originals()["dare_ties"](task_tensors, weights, density, majority_sign_method)
    d = _dare_density(density)
    return _merge("dare_ties", task_tensors, weights, "dare_ties", density=d,
                  rescale="inverse_density", election=_sign_method(majority_sign_method),
                  elect_on="unweighted", normalize="count", seed=_draw_seed())


FUNCTIONS = {"task_arithmetic": task_arithmetic, "magnitude_prune": magnitude_prune,
             "ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties}


# ----------------------------------------------------------------------------- install

def check_version(strict: bool = True) -> str:
    from . import check_supported
    return check_supported("peft", peft_version(), SUPPORTED_VERSIONS, FORCE_ENV,
                           PeftVersionError, "pip install peft", strict)


def install(backend: str = "auto", seed: Optional[int] = None, strict_version: bool = True,
            include_merge_utils: bool = True) -> None:
    """Make ``add_weighted_adapter`` (every loaded peft module that imported peft's merge
    functions, e.g. peft.tuners.lora.model) call fastmerge. ``include_merge_utils`` also
    replaces the functions in peft.utils.merge_utils itself. ``seed``: DARE seeds come from a
    private generator seeded with it (default: torch's global RNG). ``uninstall()`` restores."""
    check_version(strict_version)
    import peft.tuners.lora.model as lora_model  # noqa: F401 - make sure the seam is loaded
    orig = originals()
    missing = [n for n in NAMES if getattr(lora_model, n, None) not in (orig[n], FUNCTIONS[n])]
    if missing:
        raise PeftVersionError(f"peft {peft_version()}: peft.tuners.lora.model does not import "
                               f"{missing} from peft.utils.merge_utils; cannot patch it")
    with _State.lock:
        _State.backend = backend
        _State.generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        if _State.installed:
            return
        by_id = {id(f): n for n, f in orig.items()}
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == "peft" or mod_name.startswith("peft.")):
                continue
            if mod_name == "peft.utils.merge_utils" and not include_merge_utils:
                continue
            for attr in NAMES:
                f = mod.__dict__.get(attr)
                if f is not None and id(f) in by_id and by_id[id(f)] == attr:
                    _State.patched.append((mod, attr, f))
                    setattr(mod, attr, FUNCTIONS[attr])
        _State.installed = True


def uninstall() -> None:
    with _State.lock:
        for mod, attr, f in reversed(_State.patched):
            setattr(mod, attr, f)
        _State.patched = []
        _State.installed = False


def is_installed() -> bool:
    return _State.installed


def patched_modules() -> list[str]:
    return sorted({f"{m.__name__}.{a}" for m, a, _ in _State.patched})


def calls() -> dict:
    """How many times each fastmerge function ran (fallbacks to peft not counted)."""
    return dict(_State.calls)


@contextlib.contextmanager
def patched(backend: str = "auto", seed: Optional[int] = None, strict_version: bool = True,
            include_merge_utils: bool = True):
    from . import installed_within
    with installed_within(_State, ("backend", "generator"),
                          lambda: install(backend, seed, strict_version, include_merge_utils),
                          uninstall):
        yield


for _f in FUNCTIONS.values():
    _f.__fastmerge_patch__ = True
del _f
