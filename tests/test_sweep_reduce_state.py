"""What mergekit methods' reductions keep over a whole tensor (arcee_fusion's importances,
sce's variances, row_wise nuslerp's column sums) counted in the memory budget: a merge's
minimum includes it, a sweep's pass holds every point's at once and one point's finishing
peak (method_pass.fan_out finishes one consumer at a time), and a budget that holds fewer
points splits them into passes whose outputs are still ``fastmerge merge``'s byte for byte."""
from __future__ import annotations

import json
import struct
import threading
import time

import pytest
import test_sweep
import torch
from engine_util import merge_each_point, write_yaml

from fastmerge.cli import main
from fastmerge.methods.core import GATHERED, Job, gather_values, order_statistics
from fastmerge.methods.mergekit_methods import MERGEKIT_METHODS
from fastmerge.pipeline import native
from fastmerge.pipeline.budget import MIN_CHUNK_ELEMS, plan_chunking, work_bytes_per_element
from fastmerge.pipeline.method_pass import fan_out
from fastmerge.pipeline.reduce_state import ReduceState, in_flight
from fastmerge.pipeline.sweep import sweep
from fastmerge.recipe.config import ConfigError, load_config

pytestmark = pytest.mark.skipif(native._core() is None, reason="fastmerge._core not built")

ckpts = test_sweep.ckpts   # a bf16 base and two models of two layers


def _params(name, **given):
    return MERGEKIT_METHODS[name].schema.resolve(given, given.pop("_n", 2))


@pytest.mark.parametrize("method,params,state", [
    ("arcee_fusion", {"_n": 1}, (GATHERED, GATHERED)),   # selected in place: no more
    ("sce", {"select_topk": 0.5}, (GATHERED, GATHERED)),
    ("sce", {"select_topk": 1.0}, (0, 0)),     # nothing selected: no gather
    ("sce", {"select_topk": 0.0}, (0, 0)),
])
def test_gathering_reductions_state(method, params, state):
    job = Job((48, 32), _params(method, **params), "w")
    assert MERGEKIT_METHODS[method].state_bytes(job) == (state[0] * 1536, state[1] * 1536)


def test_other_methods_keep_no_whole_tensor_state():
    """Gram matrices, L1 sums and counts are a few float64 values per tensor; row_wise nuslerp
    keeps 3 float64 sums per column."""
    shape = (48, 32)
    for name, given in [("slerp", {"t": 0.5, "_n": 1}), ("karcher", {}), ("multislerp",
                        {"weight": [1.0, 1.0]}), ("model_stock", {}),
                        ("model_stock", {"filter_wise": True}), ("nearswap", {"t": 0.1, "_n": 1}),
                        ("ram", {}), ("ramplus_tl", {}), ("passthrough", {"_n": 1}),
                        ("della", {"density": 0.5, "weight": 0.5}),
                        ("della_linear", {"density": 0.5, "weight": 0.5}),
                        ("nuslerp", {"weight": [1.0, 2.0]}),
                        ("nuslerp", {"weight": [1.0, 2.0], "nuslerp_flatten": False})]:
        job = Job(shape, _params(name, **given), "w")
        assert MERGEKIT_METHODS[name].state_bytes(job) == (0, 0), name
    cols = Job(shape, _params("nuslerp", weight=[1.0, 2.0], nuslerp_flatten=False,
                              nuslerp_row_wise=True), "w")
    held, peak = MERGEKIT_METHODS["nuslerp"].state_bytes(cols)
    assert held == 24 * 32 and peak >= held


def test_in_flight_is_every_held_state_and_one_peak():
    a, b = ReduceState(4, 16), ReduceState(0, 0)
    assert in_flight([]) == 0 and in_flight([b, b]) == 0
    assert in_flight([a]) == 16 and in_flight([a, a, a]) == 3 * 4 + 12
    assert in_flight([a, b, ReduceState(10, 20)]) == 14 + 12


def _largest_numel(directory) -> int:
    out = 0
    for f in directory.glob("*.safetensors"):
        with open(f, "rb") as fh:
            head = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for k, v in head.items():
            if k != "__metadata__":
                n = 1
                for s in v["shape"]:
                    n *= s
                out = max(out, n)
    return out


def _arcee(tmp_path, p):
    return write_yaml(tmp_path / "arcee.yml", {
        "merge_method": "arcee_fusion", "base_model": str(p["base"]),
        "models": [{"model": str(p["models"][0])}]})


def _need(cfg, p, k: int) -> int:
    """The budget a pass of k arcee_fusion points needs at the minimal chunk: bf16 base + 1
    model in, 2-byte outputs; every point's importances held (selected in place), and each
    point's reduction thread its own scratch."""
    info = load_config(cfg).info
    one = plan_chunking(2 ** 30, "cpu", 1, 2 * 2, 2, sparsifier=info.sparsifier,
                        combine=info.combine)
    n = _largest_numel(p["base"])
    state = k * GATHERED * n
    scratch = work_bytes_per_element("cpu", 1, combine="mergekit") if k > 1 else 0
    return one.fixed + state + MIN_CHUNK_ELEMS * (one.bytes_per_elem + (k - 1) * (4 * 2 +
                                                                                 scratch))


def test_merge_minimum_counts_the_reduction(ckpts, tmp_path, capsys):
    cfg = _arcee(tmp_path, ckpts)
    need = _need(cfg, ckpts, 1)
    assert main(["merge", str(cfg), str(tmp_path / "low"), "--quiet",
                 "--memory-budget", str(need - 1)]) == 2
    err = capsys.readouterr().err
    assert f"needs at least {need} bytes" in err and "arcee_fusion's statistics" in err
    assert main(["merge", str(cfg), str(tmp_path / "ok"), "--quiet",
                 "--memory-budget", str(need)]) == 0


@pytest.mark.parametrize("room,passes", [(4, 1), (2, 2), (1, 4)])
def test_sweep_passes_hold_every_points_reduction(ckpts, tmp_path, capsys, room, passes):
    """4 arcee_fusion points: a budget of exactly what `room` points need (their outputs and
    importances) runs them `room` at a time; one byte less, fewer; each point is a merge."""
    cfg = _arcee(tmp_path, ckpts)
    grid = ["dtype=bfloat16,float16", "out_dtype=bfloat16,float16"]
    need = _need(cfg, ckpts, room)
    rows = sweep(cfg, tmp_path / "out", grid, memory_budget=need, quiet=False)
    assert len({r["pass"] for r in rows}) == passes
    merge_each_point(tmp_path, rows)
    if room > 1:
        capsys.readouterr()
        rows = sweep(cfg, tmp_path / "out1", grid, memory_budget=need - 1, quiet=False)
        assert len({r["pass"] for r in rows}) > passes
        assert "passes over the inputs" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="whole-tensor statistics of 2 points per pass"):
            sweep(cfg, tmp_path / "out2", grid, memory_budget=_need(cfg, ckpts, 2) - 1,
                  points_per_pass=2)


def test_sce_points_of_unequal_state_are_planned_per_pass(ckpts, tmp_path):
    """select_topk 1 gathers nothing, below 1 gathers: every pass of the plan is checked on
    its own points, not only the first (here the first pair fits, the second does not)."""
    cfg = write_yaml(tmp_path / "sce.yml", {
        "merge_method": "sce", "base_model": str(ckpts["base"]),
        "models": [{"model": str(m)} for m in ckpts["models"]]})
    info = load_config(cfg).info
    one = plan_chunking(2 ** 30, "cpu", 2, 3 * 2, 2, sparsifier=info.sparsifier,
                        combine=info.combine)
    n = _largest_numel(ckpts["base"])
    per = one.bytes_per_elem + 4 * 2 + work_bytes_per_element("cpu", 2, combine="mergekit")
    budget = one.fixed + GATHERED * n + MIN_CHUNK_ELEMS * per
    rows = sweep(cfg, tmp_path / "out", ["select_topk=1.0,0.5,0.9,0.4"], memory_budget=budget)
    assert len(rows) == 4 and len({r["pass"] for r in rows}) == 4
    merge_each_point(tmp_path, rows)


def test_fan_out_finishes_one_consumer_at_a_time():
    """The work after a round's last chunk (a gathering reduction's selection) is serialised
    like the work on each chunk, also between rounds (sce reads twice)."""
    busy, worst, lock = [0], [0], threading.Lock()

    def finish():
        with lock:
            busy[0] += 1
            worst[0] = max(worst[0], busy[0])
        time.sleep(0.02)
        with lock:
            busy[0] -= 1

    def gather(chunks):
        for _ in range(2):
            assert sum(chunks) == 6
            finish()

    def src():
        yield from (1, 2, 3)
    fan_out(src, [gather] * 4)
    assert worst[0] == 1


@pytest.mark.parametrize("case", ["random", "ties", "all_equal", "all_zero", "one", "odd",
                                  "inf", "nan"])
def test_order_statistics_are_kthvalues(case):
    """The in-place selection arcee_fusion and sce use gives torch.kthvalue's values (NaN
    largest), for the quartile indices arcee_fusion asks."""
    g = torch.Generator().manual_seed(0)
    n = {"one": 1, "odd": 1001}.get(case, 4096)
    x = torch.randn(n, generator=g)
    if case == "ties":
        x = torch.round(x * 2) / 2
    elif case == "all_equal":
        x = torch.full((n,), 0.75)
    elif case == "all_zero":
        x = torch.zeros(n)
    elif case == "inf":
        x[::7] = float("inf")
        x[::11] = float("-inf")
    elif case == "nan":
        x[::5] = float("nan")
    ks = ((n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4, n - 1, 0)
    want = torch.stack([torch.kthvalue(x, k + 1).values for k in ks])
    pieces = list(x.split(300))
    got = order_statistics(gather_values(n, pieces, lambda c: c), ks)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_sce_chunks_count_its_reference_scratch(ckpts, tmp_path):
    """sce's float32 reference holds more per chunk element than mergekit methods' allowance
    (Method.work_bytes): the budget plans its chunk with the difference as extra scratch."""
    job = Job((48, 32), _params("sce", select_topk=1.0), "w", n_models=2)
    own = MERGEKIT_METHODS["sce"].work_bytes(job)
    extra = own - work_bytes_per_element("cpu", 2, combine="mergekit")
    assert extra > 0 and MERGEKIT_METHODS["model_stock"].work_bytes(job) is None
    cfg = write_yaml(tmp_path / "sce.yml", {
        "merge_method": "sce", "base_model": str(ckpts["base"]),
        "parameters": {"select_topk": 1.0},   # nothing gathered: no whole-tensor state
        "models": [{"model": str(m)} for m in ckpts["models"]]})
    budget = 64 * 2 ** 20
    res = native.merge(cfg, tmp_path / "out", memory_budget=budget)
    want = plan_chunking(budget, "cpu", 2, 3 * 2, 2, extra_work=extra, sparsifier="none",
                         combine="mergekit")
    assert res.chunk_elems == want.chunk_elems


def test_sweep_threads_count_sces_reference_scratch(ckpts, tmp_path):
    """Two gathering sce points merged in one pass: the second point's reduction thread keeps
    the allowance plus sce's extra scratch per chunk element; a budget one byte short of that
    splits them into two passes (outputs still ``fastmerge merge``'s)."""
    cfg = write_yaml(tmp_path / "sce.yml", {
        "merge_method": "sce", "base_model": str(ckpts["base"]),
        "models": [{"model": str(m)} for m in ckpts["models"]]})
    job = Job((48, 32), _params("sce", select_topk=0.5), "w", n_models=2)
    allowance = work_bytes_per_element("cpu", 2, combine="mergekit")
    extra = MERGEKIT_METHODS["sce"].work_bytes(job) - allowance
    one = plan_chunking(2 ** 30, "cpu", 2, 3 * 2, 2, extra_work=extra, sparsifier="none",
                        combine="mergekit")
    n = _largest_numel(ckpts["base"])
    per = one.bytes_per_elem + 4 * 2 + allowance + extra
    fits = one.fixed + 2 * GATHERED * n + MIN_CHUNK_ELEMS * per
    for budget, passes in ((fits, 1), (fits - 1, 2)):
        out = tmp_path / f"out{passes}"
        rows = sweep(cfg, out, ["select_topk=0.5,0.6"], memory_budget=budget)
        assert len({r["pass"] for r in rows}) == passes, budget
    merge_each_point(tmp_path, rows)
