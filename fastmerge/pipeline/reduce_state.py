"""What the reductions of mergekit's methods keep over a whole tensor, for the memory budget.

A method run through its float32 reference (method_pass.py) may gather a value per element of
the tensor before it can finish (arcee_fusion's importances and sce's variances, for exact
quantiles), so its memory grows with the largest tensor, not with the chunk: the budget counts
it as a fixed part beside the chunks (budget.plan_chunking's ``reserved``). A sweep's points
of one pass hold theirs at once while the shared read feeds them, and finish one at a time
(method_pass.fan_out), so a pass needs the sum of what they hold plus the largest finishing
excess. Torch-free: the methods answer from their parameters and the tensor's shape.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReduceState:
    held: int = 0      # bytes kept while the tensor's chunks are read
    peak: int = 0      # at most, while the reduction finishes
    tensor: str = ""   # the tensor with that peak (named in the budget's error)
    method: str = ""
    work: int = 0      # per chunk element: a reference's scratch beyond the usual allowance


def point_state(cfg, inputs, specs: dict) -> ReduceState:
    """The largest state any merged tensor's reduction of one merge (a sweep point) keeps."""
    if not cfg.is_mergekit_method:
        return ReduceState()
    from ..methods.core import Job
    from ..methods.mergekit_methods import MERGEKIT_METHODS
    from .budget import work_bytes_per_element
    best = ReduceState()
    held = work = 0
    for x in inputs.merged:
        spec = specs.get(x)
        if spec is None:
            continue
        shape = tuple(int(s) for s in inputs.reference.info(x).shape)
        method = MERGEKIT_METHODS[spec.method]
        job = Job(shape, spec.params, x, n_models=spec.n_models)
        h, p = method.state_bytes(job)
        held = max(held, h)
        if p > best.peak:
            best = ReduceState(0, p, x, spec.method)
        own = method.work_bytes(job)
        if own is not None:
            allowance = work_bytes_per_element("cpu", spec.n_models, combine="mergekit")
            work = max(work, own - allowance)
    return ReduceState(held, best.peak, best.tensor, best.method, work)


def runs_reference_reduce(cfg, inputs, specs: dict) -> bool:
    """Whether some merged tensor of this merge takes its method's float32 reference
    reduction (method_pass.Point.reducer: no Gram matrix, not della's kernel): in a sweep
    it runs on a thread of its own, whose scratch glibc keeps in that thread's own arena."""
    if not cfg.is_mergekit_method:
        return False
    from ..methods.core import Job, Method
    from ..methods.mergekit_methods import MERGEKIT_METHODS
    for x in inputs.merged:
        spec = specs.get(x)
        if spec is None:
            continue
        method = MERGEKIT_METHODS[spec.method]
        job = Job(tuple(int(s) for s in inputs.reference.info(x).shape), spec.params, x)
        if type(method).reduce is not Method.reduce and method.combination(job) is None and \
                not spec.method.startswith("della"):
            return True
    return False


def in_flight(states) -> int:
    """Bytes the reductions of points merged together need at once: each holds its own while
    the shared read feeds them, and one at a time goes up to its peak to finish."""
    states = list(states)
    return sum(s.held for s in states) + max((s.peak - s.held for s in states), default=0)


def describe(state: ReduceState) -> str:
    """' (N MiB of them for METHOD's statistics of tensor T)', or '' where none."""
    if not state.peak:
        return ""
    return (f" ({state.peak / 2 ** 20:.1f} MiB of them for {state.method}'s statistics over "
            f"the whole tensor {state.tensor!r})")
