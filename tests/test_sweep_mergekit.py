"""``fastmerge sweep`` over mergekit's methods: the points of a pass merged together per tensor
(method_pass.merge_points: one Gram pre-pass per Gram matrix, one read feeding every
reduction, one read of each chunk feeding every apply), each point byte for byte ``fastmerge
merge`` of its config, over ``models:`` and ``slices:``; K slerp points read each chunk at most
twice whatever K; the reductions' fan-out (fan_out) on its own."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import test_sweep
import yaml
from engine_util import merge_each_point, same_dirs

from fastmerge.cli import main
from fastmerge.pipeline import native
from fastmerge.pipeline.core_kernels import CoreKernels
from fastmerge.pipeline.method_pass import fan_out
from fastmerge.pipeline.sweep import sweep

pytestmark = pytest.mark.skipif(native._core() is None, reason="fastmerge._core not built")


# tests/test_sweep.py's checkpoints: a base and two models of two layers
ckpts = test_sweep.ckpts


def _write(tmp_path, raw, name="c.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _models(p, method, n=2, **params):
    return {"merge_method": method, "base_model": str(p["base"]),
            "models": [{"model": str(m)} for m in p["models"][:n]],
            "parameters": params}


def _slices(p, method, **params):
    b, x, y = (str(v) for v in (p["base"], *p["models"]))
    return {"merge_method": method, "base_model": b, "parameters": params,
            "slices": [{"sources": [{"model": b, "layer_range": [0, 1]},
                                    {"model": x, "layer_range": [1, 2]},
                                    {"model": y, "layer_range": [0, 1]}]},
                       {"sources": [{"model": b, "layer_range": [1, 2]},
                                    {"model": x, "layer_range": [0, 1]},
                                    {"model": y, "layer_range": [1, 2]}]}]}


CASES = {
    "slerp_t": (lambda p: _models(p, "slerp", n=1, t=0.5), ["t=0.1,0.5,0.9"], 3),
    # linear-combination methods in one pass, a Gram matrix each (of the task vectors, of
    # the inputs with the base folded in); della beside della_linear
    "mixed": (lambda p: _models(p, "model_stock"), ["merge_method=model_stock,karcher"], 2),
    "mixed_della": (lambda p: _models(p, "della", weight=0.5, density=0.5, epsilon=0.1),
                    ["merge_method=della,della_linear", "lambda=0.5,1.0"], 4),
    # fastmerge's methods beside mergekit's in one pass: the apply read shared by all
    "with_fastmerge": (lambda p: _models(p, "model_stock"),
                       ["merge_method=model_stock,task_arithmetic,linear,karcher"], 4),
    "nuslerp": (lambda p: _models(p, "nuslerp", weight=0.5), ["weight=0.2,0.5,0.8"], 3),
    "della_density": (lambda p: _models(p, "della", weight=0.5, density=0.5, epsilon=0.1),
                      ["density=0.3,0.6,0.8", "epsilon=0.05,0.15"], 6),
    "della_linear": (lambda p: _models(p, "della_linear", weight=0.5, density=0.5,
                                       epsilon=0.1), ["density=0.4,1.0"], 2),
    # reference path: sce's reduction reads the tensor twice (fan-out rounds), nearswap none
    "sce": (lambda p: _models(p, "sce"), ["select_topk=0.3,0.7,1.0"], 3),
    "nearswap": (lambda p: _models(p, "nearswap", n=1, t=0.001), ["t=0.0005,0.002"], 2),
    "ram": (lambda p: _models(p, "ramplus_tl"), ["merge_method=ram,ramplus_tl"], 2),
    "slices_mixed": (lambda p: _slices(p, "model_stock"), ["merge_method=model_stock,karcher"],
                     2),
    "slices_della": (lambda p: _slices(p, "della", weight=0.5, density=0.5, epsilon=0.1),
                     ["density=0.3,0.7"], 2),
    "slices_t": (lambda p: {**_slices(p, "nuslerp", weight=0.5)}, ["weight=0.2,0.7"], 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk", [None, 700])
def test_points_are_merges_byte_for_byte(ckpts, tmp_path, case, chunk):
    make, grid, n = CASES[case]
    cfg = _write(tmp_path, make(ckpts))
    rows = sweep(cfg, tmp_path / "out", grid, max_chunk_elems=chunk)
    assert len(rows) == n
    merge_each_point(tmp_path, rows)


def _count_loads(monkeypatch):
    loads = collections.Counter()
    real = CoreKernels.load

    def counted(self, name, start, stop, only_reference=False):
        loads[(name, start, stop)] += 1
        return real(self, name, start, stop, only_reference)
    monkeypatch.setattr(CoreKernels, "load", counted)
    return loads


@pytest.mark.parametrize("method,grid", [
    ("slerp", "t=0.1,0.3,0.5,0.7,0.9"),
    ("della", "density=0.2,0.4,0.6,0.8,1.0"),
])
def test_k_points_read_each_chunk_at_most_twice(ckpts, tmp_path, monkeypatch, method, grid):
    """K points of a method with a pre-pass over the whole tensor (slerp's Gram matrix,
    della's L1 sums): each chunk of each tensor loaded twice (pre-pass + apply) for K = 2
    and K = 5 alike; small chunks, so every tensor has several (a tensor of one chunk is
    loaded once)."""
    loads = _count_loads(monkeypatch)
    extra = {"t": 0.5} if method == "slerp" else {"weight": 0.5, "density": 0.5,
                                                  "epsilon": 0.1}
    cfg = _write(tmp_path, _models(ckpts, method, n=1 if method == "slerp" else 2, **extra))
    key, values = grid.split("=")
    counts = {}
    for k in (2, 5):
        loads.clear()
        rows = sweep(cfg, tmp_path / f"out{k}", [f"{key}={','.join(values.split(',')[:k])}"],
                     max_chunk_elems=512)
        assert len(rows) == k and {r["pass"] for r in rows} == {1}
        counts[k] = dict(loads)
        merged = {n for (n, _, _), c in loads.items() if c > 1}
        assert merged, "no tensor of several chunks"
        assert max(loads.values()) <= 2
    assert counts[2] == counts[5]


def test_fastmerge_and_mergekit_points_share_the_apply_read(ckpts, tmp_path, monkeypatch):
    loads = _count_loads(monkeypatch)
    cfg = _write(tmp_path, _models(ckpts, "model_stock"))
    rows = sweep(cfg, tmp_path / "out", ["merge_method=model_stock,task_arithmetic,karcher"],
                 max_chunk_elems=512)
    assert {r["pass"] for r in rows} == {1}
    assert max(loads.values()) == 2   # the Gram matrices' read, then every point's apply


def test_k_reference_points_share_each_read(ckpts, tmp_path, monkeypatch):
    """sce (its reduction reads the tensor twice) x 3 points: 3 reads of each chunk, as one
    point's merge, not 3 x 3."""
    loads = _count_loads(monkeypatch)
    cfg = _write(tmp_path, _models(ckpts, "sce"))
    sweep(cfg, tmp_path / "one", ["select_topk=0.5"], max_chunk_elems=512)
    one = dict(loads)
    loads.clear()
    sweep(cfg, tmp_path / "three", ["select_topk=0.3,0.5,0.8"], max_chunk_elems=512)
    assert dict(loads) == one and max(one.values()) <= 3


# ----------------------------------------------------------------------------- fan_out
def _source(items, reads):
    def src():
        reads.append(1)
        yield from items
    return src


def test_fan_out_rounds_and_results():
    reads: list = []
    got = {}

    def once(tag):
        def f(chunks):
            got[tag] = sum(chunks)
        return f

    def twice(chunks):   # two rounds, as sce's reduction
        got["twice"] = (sum(chunks), max(chunks))

    def early(chunks):   # stops before the end of its round
        for c in chunks:
            got["early"] = c
            break

    def none(chunks):    # never iterates
        got["none"] = True

    fan_out(_source([1, 2, 3, 4], reads), [once("a"), twice, early, once("b"), none])
    assert got == {"a": 10, "b": 10, "twice": (10, 4), "early": 1, "none": True}
    assert len(reads) == 2
    reads.clear()
    fan_out(_source([5], reads), [once("c")])
    assert got["c"] == 5 and len(reads) == 1


def test_fan_out_error_is_raised_and_nothing_hangs():
    reads: list = []

    def bad(chunks):
        for c in chunks:
            if c == 2:
                raise ValueError("tensor 'x': model 0 contains NaN/Inf")

    def good(chunks):
        assert sum(chunks) == 6

    with pytest.raises(ValueError, match="NaN/Inf"):
        fan_out(_source([1, 2, 3], reads), [good, bad, good])


@pytest.mark.parametrize("case", ["slerp_t", "della_density", "sce"])
def test_points_are_merges_on_torch_kernels(ckpts, tmp_path, case):
    """The same on TorchKernels (chunks as torch tensors: TorchOps, della's torch buffers)."""
    make, grid, n = CASES[case]
    cfg = _write(tmp_path, make(ckpts))
    out = tmp_path / "out"
    argv = ["sweep", str(cfg), str(out), "--quiet", "--backend", "torch"]
    assert main(argv + [x for g in grid[:1] for x in ("--grid", g)]) == 0
    for p in sorted(x for x in out.iterdir() if x.is_dir()):
        one = tmp_path / "single" / p.name
        point_cfg = tmp_path / f"{p.name}.yml"
        point_cfg.write_text((p / "fastmerge_config.yml").read_text())
        assert main(["merge", str(point_cfg), str(one), "--quiet", "--backend", "torch"]) == 0
        same_dirs(p, one)
        assert b'"backend": "torch"' in (p / "model.safetensors.index.json").read_bytes()


def test_fan_out_reader_error_stops_every_consumer():
    def src():
        yield 1
        raise OSError("truncated file")

    def twice(chunks):
        for _ in range(2):
            sum(chunks)

    with pytest.raises(OSError, match="truncated"):
        fan_out(src, [twice, twice, lambda chunks: None])


def test_budget_holds_every_points_outputs(ckpts, tmp_path, capsys):
    """The budget covers each mergekit point's outputs of a chunk: room for one point at the
    minimal chunk, not for three, splits the slerp points into passes (each still a merge)."""
    from fastmerge.pipeline.budget import MIN_CHUNK_ELEMS, plan_chunking
    from fastmerge.recipe.config import ConfigError, load_config
    cfg = _write(tmp_path, _models(ckpts, "slerp", n=1, t=0.5))
    info = load_config(cfg).info
    # bf16 base + 1 model in, bf16 out
    one = plan_chunking(2 ** 30, "cpu", 1, 2 * 2, 2, sparsifier=info.sparsifier,
                        combine=info.combine)
    budget = one.fixed + MIN_CHUNK_ELEMS * (one.bytes_per_elem + 2)
    rows = sweep(cfg, tmp_path / "out", ["t=0.2,0.5,0.8"], memory_budget=budget, quiet=False)
    assert len({r["pass"] for r in rows}) == 3
    assert "passes over the inputs" in capsys.readouterr().err
    merge_each_point(tmp_path, rows)
    with pytest.raises(ConfigError, match="points per pass"):
        sweep(cfg, tmp_path / "out2", ["t=0.2,0.5,0.8"], memory_budget=budget,
              points_per_pass=2)
