"""The method table and parameter validation shared by every backend.

``resolve_spec`` turns the user's arguments into a :class:`MergeSpec` with every default
filled in and every value checked, so the reference and the fast backends read one resolved
description of the merge and never re-interpret user input.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Optional, Union

# Sparsifier kinds (per model). "none" keeps t_i, "topk" keeps |t| >= T(k), "band" is the
# breadcrumbs band, "dare" the Philox keep-mask, "fisher" the top-k of t*t*v (FFG).
SPARSIFIERS = ("none", "topk", "band", "dare", "fisher")
# Combine kinds: how the sparsified, weighted task vectors become one merged vector.
COMBINES = ("linear", "sum", "ties", "consensus_sum", "consensus_ties", "ota")


@dataclass(frozen=True)
class MethodInfo:
    sparsifier: str
    combine: str
    normalize: Union[bool, str]   # default of ``normalize``
    rescale: Optional[str]        # default of ``rescale``
    density: float = 1.0          # default per-model density
    needs_base: bool = True
    needs_second_moments: bool = False
    paper: str = ""


METHODS: dict[str, MethodInfo] = {
    "linear": MethodInfo("none", "linear", True, None, needs_base=False,
                         paper="https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": MethodInfo("none", "sum", False, None,
                                  paper="https://arxiv.org/abs/2212.04089"),
    "magnitude_prune": MethodInfo("topk", "sum", False, None,
                                  paper="https://github.com/huggingface/peft"),
    "ties": MethodInfo("topk", "ties", True, None, paper="https://arxiv.org/abs/2306.01708"),
    "dare_linear": MethodInfo("dare", "sum", False, "inverse_density",
                              paper="https://arxiv.org/abs/2311.03099"),
    "dare_ties": MethodInfo("dare", "ties", True, "inverse_density",
                            paper="https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": MethodInfo("band", "sum", False, None,
                              paper="https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": MethodInfo("band", "ties", True, None,
                                   paper="https://arxiv.org/abs/2312.06795"),
    "consensus_ta": MethodInfo("topk", "consensus_sum", False, None,
                               paper="https://arxiv.org/abs/2405.07813"),
    "consensus_ties": MethodInfo("topk", "consensus_ties", True, None,
                                 paper="https://arxiv.org/abs/2405.07813"),
    "ffg": MethodInfo("fisher", "sum", False, None, density=0.1, needs_second_moments=True,
                      paper="https://arxiv.org/abs/2505.12471"),
    "ota": MethodInfo("none", "ota", False, None, needs_second_moments=True,
                      paper="https://arxiv.org/abs/2505.12471"),
    "ota_ffg": MethodInfo("fisher", "ota", False, None, density=0.1, needs_second_moments=True,
                          paper="https://arxiv.org/abs/2505.12471"),
}
ALIASES = {"consensus": "consensus_ta"}
RESCALES = (None, "l1", "inverse_density")
ELECTIONS = ("sum", "count")
ELECT_ON = ("weighted", "unweighted")
NORMALIZES = (False, True, "count")
FFG_METRICS = ("fisher", "magnitude")
OTA_NORMALIZES = (None, "global")
SCOPES = ("tensor", "model")


def canonical_method(method: str) -> str:
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {type(method).__name__}")
    name = ALIASES.get(method, method)
    if name not in METHODS:
        allowed = ", ".join(sorted(list(METHODS) + list(ALIASES)))
        raise ValueError(f"unknown merge method {method!r}; supported methods: {allowed}")
    return name


def _check_number(name: str, value, lo=None, hi=None, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return float(value)


def _per_model(name: str, value, n: int, default: float, lo=None, hi=None) -> tuple[float, ...]:
    if value is None:
        return (float(default),) * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} models")
        return tuple(_check_number(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(value))
    torch = sys.modules.get("torch")  # a tensor means torch is loaded; never import it here
    if torch is not None and isinstance(value, torch.Tensor):
        return _per_model(name, value.tolist(), n, default, lo, hi)
    return (_check_number(name, value, lo, hi),) * n


@dataclass(frozen=True)
class MergeSpec:
    """A fully resolved merge of N models: every default filled in, every value validated."""
    method: str
    n_models: int
    sparsifier: str
    combine: str
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    lambda_: float = 1.0
    normalize: Union[bool, str] = False
    rescale: Optional[str] = None
    election: str = "sum"
    elect_on: str = "weighted"
    seed: int = 0
    lines_factor: float = 1.0
    consensus_lambdas: tuple[float, ...] = ()
    consensus_k: int = 2
    ffg_metric: str = "fisher"
    power: float = 0.5
    ota_normalize: Optional[str] = None
    eps: float = 1e-8
    scope: str = "tensor"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def scale(self) -> float:
        """The factor on the merged task vector: lambda * LiNeS(tensor)."""
        return self.lambda_ * self.lines_factor

    @property
    def uses_ties_election(self) -> bool:
        return self.combine in ("ties", "consensus_ties")

    @property
    def score(self) -> str:
        """What the top-k selects on: "magnitude" |t| or "fisher" t*t*v."""
        return "fisher" if self.sparsifier == "fisher" and self.ffg_metric == "fisher" \
            else "magnitude"

    @property
    def needs_second_moments(self) -> bool:
        return self.score == "fisher" or self.combine == "ota"

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def resolve_spec(method: str, n_models: int, *, weights=None, density=None, gamma=None,
                 lambda_=None, normalize=None, rescale="default", election=None,
                 elect_on=None, seed=None, lines_factor=None, consensus_lambda=None,
                 consensus_k=None, ffg_metric=None, power=None, ota_normalize=None,
                 eps=None, scope=None) -> MergeSpec:
    """Validate the user's parameters for ``method`` over ``n_models`` and fill in defaults.

    Per-model parameters (weights, density, gamma, consensus_lambda) take one number for all
    models or a sequence of N numbers. ``rescale="default"`` means the method's default."""
    name = canonical_method(method)
    info = METHODS[name]
    if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 1:
        raise ValueError(f"a merge needs at least one model, got {n_models!r}")
    if normalize is None:
        normalize = info.normalize
    if normalize not in NORMALIZES or (normalize is not True and normalize is not False
                                       and normalize != "count"):
        raise ValueError(f"normalize must be True, False or 'count'; got {normalize!r}")
    if rescale == "default":
        rescale = info.rescale
    if rescale is True:  # mergekit's spelling
        rescale = "l1"
    if rescale is False:
        rescale = None
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be None, 'l1' or 'inverse_density'; got {rescale!r}")
    election = "sum" if election is None else election
    if election not in ELECTIONS:
        raise ValueError(f"election must be 'sum' or 'count'; got {election!r}")
    elect_on = "weighted" if elect_on is None else elect_on
    if elect_on not in ELECT_ON:
        raise ValueError(f"elect_on must be 'weighted' or 'unweighted'; got {elect_on!r}")
    ffg_metric = "fisher" if ffg_metric is None else ffg_metric
    if ffg_metric not in FFG_METRICS:
        raise ValueError(f"ffg_metric must be 'fisher' or 'magnitude'; got {ffg_metric!r}")
    if ota_normalize not in OTA_NORMALIZES:
        raise ValueError(f"ota_normalize must be None or 'global'; got {ota_normalize!r}")
    scope = "tensor" if scope is None else scope
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'tensor' or 'model'; got {scope!r}")
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed >= 2 ** 64:
        raise ValueError(f"seed must be an integer in [0, 2^64); got {seed!r}")
    consensus_k = 2 if consensus_k is None else consensus_k
    if isinstance(consensus_k, bool) or not isinstance(consensus_k, int) or consensus_k < 0:
        raise ValueError(f"consensus_k must be a non-negative integer; got {consensus_k!r}")
    spec = MergeSpec(
        method=name, n_models=n_models, sparsifier=info.sparsifier, combine=info.combine,
        weights=_per_model("weights", weights, n_models, 1.0),
        densities=_per_model("density", density, n_models, info.density, 0.0, 1.0),
        gammas=_per_model("gamma", gamma, n_models, 0.01, 0.0, 1.0),
        lambda_=_check_number("lambda_", 1.0 if lambda_ is None else lambda_),
        normalize=normalize, rescale=rescale, election=election, elect_on=elect_on, seed=seed,
        lines_factor=_check_number("lines_factor", 1.0 if lines_factor is None else lines_factor),
        consensus_lambdas=_per_model("consensus_lambda", consensus_lambda, n_models, 0.6, 0.0),
        consensus_k=consensus_k, ffg_metric=ffg_metric,
        power=_check_number("power", 0.5 if power is None else power),
        ota_normalize=ota_normalize,
        eps=_check_number("eps", 1e-8 if eps is None else eps, 0.0), scope=scope)
    return spec


def top_k_count(density: float, n: int) -> int:
    """k = max(1, floor(d*n)) for 0 < d < 1; n for d >= 1; 0 for d <= 0 (docs/semantics.md)."""
    if density >= 1.0:
        return n
    if density <= 0.0 or n == 0:
        return 0
    return max(1, math.floor(density * n))


def band_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """Breadcrumbs (n_top, k_lo): drop the n_top largest, keep down to the k_lo-th largest.

    n_top = min(floor(g n), n - kd), k_lo = n_top + kd with kd = top_k_count(d, n)."""
    kd = top_k_count(density, n)
    n_top = min(math.floor(gamma * n), n - kd)
    return n_top, n_top + kd
