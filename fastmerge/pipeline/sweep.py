"""Sweeps: the K points of a grid (recipe/grid.py) merged from one read of the inputs. Each
input chunk is loaded once and every point's fused pass runs on it; each point has its own
plan (thresholds per point, one selection serving every point that selects on the same
scores), kernels object (its own output buffers), writer thread and shards, under
``OUT_DIR/<point>/``, all in one atomic output directory. Every point's files are byte for
byte ``fastmerge merge``'s of its config: the same resolve, prepare and kernels as
driver.py, only the loop over tensors is shared. The points of mergekit's methods are merged
together per tensor (method_pass.merge_points): one pre-pass read feeding every Gram matrix
and reduction they need, then the apply read shared with the fused pass.

Points whose inputs differ (a method without a base among methods with one) or that need
other kernels (second moments: torch) run in their own pass; the memory budget covers the
outputs of every point of a pass, and too many points for it are split into passes.
"""
from __future__ import annotations

import dataclasses
import errno
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..checkpoint.safetensors_file import ST_SIZES, CheckpointError
from ..methods.kernel_params import pass_ids
from ..output.report import (
    NonFiniteCheck,
    NonFiniteOutput,
    default_budget,
    progress_factory,
    write_extras,
)
from ..output.writer import (
    OutputError,
    output_dir_at_start,
    parse_size,
)
from ..planning.planner import SELECTING, one_pass_source, plan_rows
from ..planning.thresholds import Selection, nonfinite_error, per_model, selection_requests
from ..recipe.config import ConfigError, load_config
from ..recipe.grid import expand
from . import reduce_state
from .budget import (
    MIN_CHUNK_ELEMS,
    Chunking,
    release_freed_memory_promptly,
    trim_freed_memory,
    work_bytes_per_element,
)
from .driver import _Passes, _Writes, out_chunk_bytes, prepare, resolve
from .inputs import check_output_apart_from_inputs, name_files
from .launch_env import env_rank, local_world_size
from .method_pass import Point, merge_points
from .sliced import (
    close_inputs,
    hub_downloads,
    open_headers_only,
    open_merge_inputs,
    reroute,
    same_routes,
)


@dataclass
class Member:
    """One grid point in a pass: its resolution, kernels, passes object and outputs."""
    point: object
    r: object
    k: object
    eng: object = None
    prepared: object = None
    writer: object = None
    writes: object = None
    nonfinite: object = None
    seconds: float = 0.0            # its own planning and fused passes
    row: dict = field(default_factory=dict)


@dataclass
class Group:
    """Points that read the same checkpoints with the same kind of kernels, in one pass over
    them. ``inputs``: those the group was opened with; a 'slices:' point carries its own
    re-planned inputs (its Member's ``r.inputs``: its routes over these checkpoints, which
    equal the group's, ``sliced.same_routes``)."""
    inputs: object
    members: list


def _kind(cfg, device, backend):
    from .native import why_not
    return (why_not(cfg, device, backend) is None, cfg.needs_base,
            cfg.info.needs_second_moments)


def _make_kernels(cfg, device, backend):
    from .native import kernels_for
    make, _ = kernels_for(cfg, device, backend)
    return make()


def chunking_for(members: list, budget: int, max_chunk_elems=None) -> Optional[Chunking]:
    """The chunk size when ``members`` share each loaded chunk: one point's cost per element
    plus the output buffers of the others (their scratch is reused point after point), after
    what their reductions keep over a whole tensor at once (reduce_state.py), or None when
    the budget cannot hold a minimal chunk for all of them."""
    fixed, per, reserved = pass_cost(members)
    elems = (budget - fixed) // per
    if elems < MIN_CHUNK_ELEMS:
        return None
    if max_chunk_elems is not None:
        elems = min(elems, int(max_chunk_elems))
    return Chunking(int(elems), per, fixed, reserved, members[0].r.chunking.work)


def pass_cost(members: list) -> tuple:
    """(fixed bytes, bytes per chunk element, of the fixed: the reductions' state) of a pass
    merging ``members`` together."""
    one = members[0].r.chunking
    outs = 4 if members[0].k.chunking_name == "cpu" and str(members[0].k.device) == "cpu" else 3
    item = max([ST_SIZES[m.r.out_st[x]] for m in members for x in m.r.inputs.merged] or [4])
    per = one.bytes_per_elem + (len(members) - 1) * outs * item
    # reference reductions run on a thread each (method_pass.fan_out): one at a time, but each
    # thread's freed scratch stays resident in its own glibc arena
    threads = sum(reduce_state.runs_reference_reduce(m.r.cfg, m.r.inputs, m.r.base_specs)
                  for m in members)
    states = [reduce_state.point_state(m.r.cfg, m.r.inputs, m.r.base_specs) for m in members]
    # a reference's scratch beyond the allowance (sce's): the first point's is in ``one``
    work = max(s.work for s in states)
    per += work - states[0].work
    if threads > 1:
        per += (threads - 1) * (work + work_bytes_per_element(
            members[0].k.chunking_name, len(members[0].r.inputs.models),
            combine=members[0].r.cfg.info.combine))
    reserved = reduce_state.in_flight(states)
    return one.fixed - one.reserved + reserved, per, reserved


def output_bytes(m: Member) -> int:
    ref = m.r.inputs.reference
    return sum(ref.info(x).numel * ST_SIZES[m.r.out_st[x]] for x in m.r.inputs.order)


# ----------------------------------------------------------------------------- shared plans
def shared_thresholds(members: list, name: str, numel: int, k0, src) -> dict:
    """member index -> per-model thresholds, from one selection for all the points that
    select on the same scores (several densities: several requests of one selection)."""
    groups: dict = {}
    for j, m in enumerate(members):
        spec = m.prepared.specs[name]
        if spec.sparsifier in SELECTING and m.prepared.thresholds is None and \
                spec.rescale != "l1" and not m.eng.plans.get(name):
            groups.setdefault((pass_ids(spec)["score"], spec.n_models), []).append(j)
    out = {}
    for (score, n), js in groups.items():
        if len(js) < 2:
            continue
        reqs = {j: selection_requests(members[j].prepared.specs[name], numel) for j in js}
        flat = [(i, kk) for j in js for i, ks in enumerate(reqs[j]) for kk in ks]
        reduce = members[js[0]].eng.reduce(name)   # rows split over ranks: summed histograms
        got = k0.one_pass(one_pass_source(src, score, False), flat, n, numel, score, (name,),
                          False) if reduce is None else None
        if got is None:
            got = k0.radix(src, flat, n, score, (name,), reduce, False)
        sel, pos = got[0], 0
        for j in js:
            count = sum(len(ks) for ks in reqs[j])
            thr, _ = per_model(reqs[j], Selection(sel.thresholds[pos:pos + count], None), False)
            out[j] = thr
            pos += count
    return out


def plan_point(m: Member, name: str, numel: int, src, thresholds):
    spec = m.prepared.specs[name]
    plan = m.eng.plans.pop(name, None)
    if plan is not None:   # the alpha=auto pass's plan, with this spec's LiNeS factor
        return dataclasses.replace(plan, spec=spec, compiled={})
    thr = thresholds if thresholds is not None else m.prepared.thresholds
    return plan_rows(spec, numel, name, m.k, src, thr, m.eng.reduce(name))


# ----------------------------------------------------------------------------- one pass
def run_pass(members: list, inputs, chunking: Chunking, root: Path, quiet: bool) -> float:
    """Merge every member from one read of the inputs into ``root/<point>/``; the pass's
    wall time. Under torchrun every rank runs it on its own tensors (``r.mine``) and writes
    them into the shards rank 0 laid out (parallel.py), as a merge does."""
    t0 = time.perf_counter()
    for m in members:
        m.r.chunking = chunking
        m.k.configure(chunking, out_chunk_bytes(m.r))
        m.nonfinite = NonFiniteCheck(m.row.pop("_allow_nonfinite", False))
        m.eng = _Passes(m.r, m.k, progress_factory(True), m.nonfinite)
        m.k.start()
    lead = members[0]
    try:
        for m in members:   # per point: model-wide thresholds, LiNeS alpha=auto (own reads)
            s = time.perf_counter()
            m.prepared = prepare(m.r, m.k, m.eng)
            m.seconds += time.perf_counter() - s
            dist = m.k.dist
            if dist.is_index_writer(m.r.rank):
                (root / m.point.name).mkdir()
            m.writer = dist.shard_writer(m.prepared.layout, root / m.point.name)
            m.writes = _Writes()
        _shared_loop(members, lead, quiet)
        for m in members:
            m.writes.flush()
            m.writer.close(check=True)
            p = m.prepared
            if m.k.dist.is_index_writer(m.r.rank):
                write_extras(root / m.point.name, p.layout, m.r.cfg, inputs, p.resolved,
                             p.per_tensor, p.config_text)
            m.nonfinite.warn()
    finally:
        for m in members:
            if m.writes is not None:
                m.writes.close()
            if m.writer is not None:
                m.writer.close()
            if m.eng is not None:
                m.eng.close()
    return time.perf_counter() - t0


def _shared_loop(members: list, lead: Member, quiet: bool) -> None:
    order = lead.r.mine
    bar = _bar(quiet, len(members), len(order))
    sources = lead.eng.tensor_sources(order, set(lead.r.my_merged))
    try:
        for name, is_merged, src in sources:
            if not is_merged:
                for ch in src():
                    for m in members:
                        slot = m.writes.slot()
                        m.writes.submit(slot, m.k.write_copy, m.writer, name, ch.offset, ch)
                    del ch
            else:
                try:
                    _merge_tensor(members, lead, name, src)
                except (CheckpointError, NonFiniteOutput):
                    raise
                except ValueError as exc:
                    raise name_files(exc, lead.r.inputs, name) from None
            del src
            bar.update(len(members))
        for m in members:
            m.writes.flush()
    finally:
        sources.close()
        bar.close()


def _merge_tensor(members: list, lead: Member, name: str, src) -> None:
    """Tensor ``name`` for every point: fastmerge's methods' plans (shared selections), then
    the points of mergekit's methods (method_pass.merge_points) with every point's output of
    a chunk computed from its one read."""
    ours = [m for m in members if m.r.cfg.is_mergekit_method]
    rest = [m for m in members if not m.r.cfg.is_mergekit_method]
    apply = _fused_points(rest, lead, name, src) if rest else None
    if not ours:
        for ch in src():    # the one read of each chunk; every point's fused pass on it
            apply(ch)
            del ch
        return
    t = time.perf_counter()
    units = lead.eng.units(name)
    points = [Point(m.eng, name, m.prepared.specs[name], units, m.writer, m.writes)
              for m in ours]
    merge_points(points, name, units, src, lead.eng.source, also=apply)
    share = (time.perf_counter() - t) / len(ours)   # the shared passes, split evenly (rough)
    for m in ours:
        m.seconds += share


def _fused_points(members: list, lead: Member, name: str, src):
    """The plans of fastmerge's methods' points (one selection for those selecting on the
    same scores) and the function merging a chunk for each of them."""
    numel = lead.eng.numel(name)
    s = time.perf_counter()
    shared = shared_thresholds(members, name, numel, lead.k, src)
    plans = []
    for j, m in enumerate(members):
        t = time.perf_counter()
        plans.append(plan_point(m, name, numel, src, shared.get(j)))
        m.seconds += time.perf_counter() - t
    share = (time.perf_counter() - s) / len(members)
    for m in members:
        m.seconds += share / 2   # the shared selection, split evenly (rough)

    def apply(ch):
        for m, plan in zip(members, plans):
            t = time.perf_counter()
            k, st = m.k, m.r.out_st[name]
            off, stop = ch.offset, ch.offset + k.chunk_numel(ch)
            slot = m.writes.slot()
            out, bad = k.merge(ch, plan, st, slot)
            for i, c in enumerate(bad):
                if c:
                    raise nonfinite_error(i, int(c), (name,))
            m.writes.submit(slot, m.eng.write_checked, m.writer, name, off, stop, st, out)
            del out
            m.seconds += time.perf_counter() - t
    return apply


class _Bar:
    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="merge", dynamic_ncols=True, leave=True)

    def update(self, n):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def _bar(quiet: bool, points: int, tensors: int):
    if quiet:
        return progress_factory(True)("", 0)
    return _Bar(points * tensors, f"sweep: {points} points x {tensors} tensors")


# ----------------------------------------------------------------------------- the sweep
def _note(quiet: bool, text: str) -> None:
    if not quiet:
        print(f"fastmerge: {text}", file=sys.stderr)


def sweep(config, out_dir, grid, *, eval_command: Optional[str] = None,
          eval_metric: Optional[str] = None, keep_best: Optional[int] = None,
          memory_budget=None, points_per_pass: Optional[int] = None, shard_size="5GB",
          seed: Optional[int] = None, device: str = "cpu", backend: str = "auto",
          quiet: bool = True, lines_pattern: Optional[str] = None,
          max_chunk_elems: Optional[int] = None, allow_nonfinite: bool = False) -> list:
    """Merge every point of ``grid`` (``["density=0.2,0.5", ...]`` or ``{"density": [0.2,
    0.5]}``) over ``config`` into ``out_dir/<point>/`` from one read of the inputs; evaluate
    each with ``eval_command``; return the table (one dict per point, also written to
    ``out_dir/sweep.csv`` and ``sweep.json``). Under torchrun every rank merges its share
    of the tensors of every point and rank 0 writes the table and evaluates."""
    from .sweep_eval import finish
    base = load_config(config) if not hasattr(config, "raw") else config
    points = expand(base.raw, grid, base.base_dir)
    if keep_best is not None and (keep_best < 1 or not eval_command):
        raise ConfigError("--keep-best N needs N >= 1 and an --eval-command to rank the points")
    if points_per_pass is not None and points_per_pass < 1:
        raise ConfigError(f"--points-per-pass must be >= 1, got {points_per_pass}")
    target = output_dir_at_start(out_dir)
    check_output_apart_from_inputs(base, target)
    if target.exists():
        raise FileExistsError(f"output directory {target} already exists; a sweep writes a new "
                              f"OUT_DIR (choose another path, or remove it)")
    # as a merge's: the default budget is per process, shared by the ranks of one node
    budget = parse_size(memory_budget, "memory budget") if memory_budget is not None \
        else default_budget() // local_world_size()
    shard_bytes = parse_size(shard_size, "shard size")
    if lines_pattern is not None:
        for p in points:
            if p.cfg.lines is not None:
                p.cfg.lines.pattern = lines_pattern
    release_freed_memory_promptly()
    kinds: dict = {}
    for p in points:
        kinds.setdefault(_kind(p.cfg, device, backend), []).append(p)
    settings = dict(device=device, backend=backend, budget=budget, target=target,
                    shard_bytes=shard_bytes, seed=seed, lines_pattern=lines_pattern,
                    max_chunk_elems=max_chunk_elems, allow_nonfinite=allow_nonfinite)
    quiet = quiet or env_rank() != 0
    # hub models to download (the points share them): every check on their headers first
    if hub_downloads(points[0].cfg):
        _plan_and_check(open_headers_only, kinds, budget, points_per_pass, max_chunk_elems,
                        settings, True)
    opened: list = []
    t_start = time.perf_counter()
    try:
        passes = _plan_and_check(open_merge_inputs, kinds, budget, points_per_pass,
                                 max_chunk_elems, settings, quiet, opened)
        dist = opened[0].members[0].k.dist
        rank = opened[0].members[0].r.rank
        rows = []
        with dist.output_directory(target) as adir:
            for n, (group, members, chunking) in enumerate(passes, 1):
                secs = run_pass(members, group.inputs, chunking, adir.tmp, quiet)
                for m in members:
                    rows.append(_row(m, n, secs, target))
            if dist.is_index_writer(rank):
                from .sweep_eval import write_table
                write_table(adir.tmp, rows)
            final = adir.commit()
        _note(quiet, f"sweep: {len(rows)} points in {len(passes)} pass(es), "
                     f"{time.perf_counter() - t_start:.1f} s -> {final}")
        dist.shutdown()
    finally:
        _close(opened)
        trim_freed_memory()
    if not dist.is_index_writer(rank):   # rank 0 evaluates, keeps the best and plots
        return rows
    return finish(final, rows, eval_command, eval_metric, keep_best, quiet)


def _plan_and_check(open_inputs, kinds: dict, budget: int, per_pass, max_chunk_elems,
                    settings: dict, quiet: bool, opened: Optional[list] = None) -> list:
    """Every point resolved on ``open_inputs(cfg, needs_moments)`` of its group, the passes
    planned and the disk checked: every error a sweep can know of before reading a weight.
    Into ``opened`` (else closed here): the groups, their inputs bound to the kernels."""
    keep = opened is not None
    opened = opened if keep else []
    try:
        for kind, pts in kinds.items():
            with _at_point(pts[0]):   # a 'slices:' config is planned with its values
                inputs = open_inputs(pts[0].cfg, kind[2])
            if inputs is None:
                return []
            group = Group(inputs, [])
            opened.append(group)
            for p in pts:
                p_inputs, p_group = _point_inputs(p, group, opened, kind[2], open_inputs)
                if p_inputs is None:
                    return []
                p_group.members.append(_member(p, p_inputs, settings, bind=keep))
        passes = _plan_passes(opened, budget, per_pass, max_chunk_elems, quiet)
        _check_disk(settings["target"], [m for g in opened for m in g.members])
        return passes
    finally:
        if not keep:
            _close(opened)


@contextmanager
def _at_point(p):
    """A config error while a point is resolved or re-planned names the point."""
    try:
        yield
    except ConfigError as exc:
        where = ", ".join(f"{a}={b}" for a, b in p.values.items())
        raise ConfigError(f"grid point {where}: {exc}") from None


def _member(p, inputs, s: dict, bind: bool) -> Member:
    k = _make_kernels(p.cfg, s["device"], s["backend"])
    m = Member(p, None, k, row={"_allow_nonfinite": s["allow_nonfinite"]})
    try:
        with _at_point(p):
            if bind:
                k.bind(inputs)
            m.r = resolve(p.cfg, inputs, chunking_name=k.chunking_name, device=k.device,
                          dist=k.dist, budget=s["budget"], out_dir=s["target"] / p.name,
                          shard_bytes=s["shard_bytes"], seed=s["seed"],
                          lines_pattern=s["lines_pattern"],
                          max_chunk_elems=s["max_chunk_elems"])
    except BaseException:
        k.close()
        raise
    return m


def _close(groups: list) -> None:
    for g in groups:
        for m in g.members:
            m.k.close()
        close_inputs(g.inputs)


def _point_inputs(p, group: Group, opened: list, moments: bool, open_inputs) -> tuple:
    """(the point's inputs, its Group). A 'models:' config's points share ``group``'s
    Inputs. A 'slices:' point is re-planned (sliced.reroute: its parameters and method) over
    the checkpoints of the first Group of its kind (``group`` or one opened after it) whose
    routes it shares, else opens its own (a method with a base among methods without, a
    passthrough scale of 1 beside another) with ``open_inputs``."""
    if group.inputs.plan is None:
        return group.inputs, group
    first = next(i for i, g in enumerate(opened) if g is group)
    with _at_point(p):
        for g in opened[first:]:
            p_inputs = reroute(g.inputs, p.cfg)
            if same_routes(p_inputs, g.inputs):
                return p_inputs, g
        inputs = open_inputs(p.cfg, moments)
    if inputs is None:   # a hub pre-check that cannot see these inputs' headers
        return None, None
    g = Group(inputs, [])
    opened.append(g)
    return g.inputs, g


def _plan_passes(groups: list, budget: int, per_pass: Optional[int], max_chunk_elems,
                 quiet: bool) -> list:
    """[(group, members, chunking)]: each group's points, ``per_pass`` at a time, else as
    many as the budget holds (said before starting when that is fewer than all)."""
    out = []
    for g in groups:
        ms = g.members
        p = min(per_pass or len(ms), len(ms))
        while p > 0 and (bad := _unfit(ms, p, budget)) is not None:
            if per_pass is not None:
                fixed, per, reserved = pass_cost(bad)
                need = fixed + MIN_CHUNK_ELEMS * per
                held = f" and {reserved / 2 ** 20:.1f} MiB of their whole-tensor statistics" \
                    if reserved else ""
                raise ConfigError(f"memory budget {budget / 2 ** 20:.1f} MiB cannot hold the "
                                  f"outputs{held} of {p} points per pass (about "
                                  f"{need / 2 ** 20:.1f} MiB); lower --points-per-pass or "
                                  f"raise --memory-budget")
            p -= 1
        if p < len(ms) and per_pass is None:
            _note(quiet, f"sweep: the memory budget ({budget / 2 ** 20:.0f} MiB) holds the "
                         f"outputs and statistics of {p} of {len(ms)} points at once: "
                         f"{-(-len(ms) // p)} passes over the inputs")
        for s in range(0, len(ms), p):
            chunk = ms[s:s + p]
            out.append((g, chunk, chunking_for(chunk, budget, max_chunk_elems)))
    return out


def _unfit(ms: list, p: int, budget: int) -> Optional[list]:
    """The first pass of ``p`` points of ``ms`` the budget cannot hold, or None (one point
    alone always fits: its merge's resolve checked it)."""
    for s in range(0, len(ms), p):
        if chunking_for(ms[s:s + p], budget) is None:
            return ms[s:s + p]
    return None


def _check_disk(target: Path, members: list) -> None:
    need = sum(output_bytes(m) for m in members)
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need > free:
        raise OutputError(errno.ENOSPC, f"the sweep's {len(members)} outputs need "
                                        f"{need / 1e9:.2f} GB but {parent} has "
                                        f"{free / 1e9:.2f} GB free; sweep fewer points")


def _row(m: Member, n_pass: int, pass_seconds: float, target: Path) -> dict:
    return {"point": m.point.name, **{k: v for k, v in m.point.values.items()},
            "path": str(target / m.point.name), "pass": n_pass,
            "merge_seconds": round(m.seconds, 4), "pass_seconds": round(pass_seconds, 4),
            "bytes_out": m.prepared.layout.total_size, "score": None, "eval_status": None,
            "eval_seconds": None, "weights": "kept"}
