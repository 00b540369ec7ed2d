"""The merge pass's order (driver.processing_order): the tensors split over ranks first, in
one order on every rank, then the others largest first, ties in output order, so the run ends
on small tensors; the output and the NaN/Inf record do not depend on it, in one process or
under torchrun with every rank in another order."""
from __future__ import annotations

import json

import pytest
from engine_util import write_yaml

from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.output.writer import ShardWriter
from fastmerge.pipeline import load_config
from fastmerge.pipeline.driver import processing_order
from fastmerge.pipeline.native import merge_natively


def test_largest_first_ties_in_output_order():
    sizes = {"a": 4, "b": 32, "c": 2, "d": 32, "e": 8}
    assert processing_order(list(sizes), sizes.get) == ["b", "d", "e", "a", "c"]


@pytest.mark.parametrize("method", ["linear", "model_stock"])
def test_the_merge_ends_on_the_smallest_tensor(tmp_path, monkeypatch, method):
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=2, hidden=32, inter=48,
                                   vocab=64, shards=1)
    cfg = {"merge_method": method, "base_model": str(p["base"]),
           "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in p["models"]]}
    if method == "model_stock":
        for m in cfg["models"]:
            m.pop("parameters")
    written = []
    write_bytes = ShardWriter.write_bytes

    def record(self, name, offset, data):
        written.append((name, memoryview(data).nbytes))
        return write_bytes(self, name, offset, data)
    monkeypatch.setattr(ShardWriter, "write_bytes", record)
    merge_natively(load_config(write_yaml(tmp_path / "c.yml", cfg)), tmp_path / "out")
    sizes = [n for _, n in written]
    assert sizes == sorted(sizes, reverse=True)
    assert len({name for name, _ in written}) == len(written)


def test_split_tensors_keep_their_order_first():
    """A split tensor's bytes on a rank (by which it would sort) differ between ranks by a
    row; its thresholds are reduced over the ranks, so it keeps the partition's order."""
    sizes = {"embed": 8832, "down": 9216, "up": 9216, "norm": 384, "k": 6144, "lm_head": 8832}
    split = {"embed": (0, 23), "down": (0, 16), "lm_head": (0, 23)}
    assert processing_order(list(sizes), sizes.get, split) == \
        ["embed", "down", "lm_head", "up", "k", "norm"]


# ----------------------------------------------------------------------------- any order
ORDER_METHODS = {"ties": {"weight": 0.6, "density": 0.5},
                 "dare_ties": {"weight": 0.6, "density": 0.5}}


def _order_cases(tmp_path) -> dict:
    """ties and dare_ties (thresholds per tensor) over tiny checkpoints whose vocabulary (37
    rows) does not divide over two ranks."""
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=2, hidden=32, inter=48,
                                   vocab=37, shards=1)
    return {m: write_yaml(tmp_path / f"{m}.yml", {
        "merge_method": m, "base_model": str(p["base"]),
        "models": [{"model": str(x), "parameters": params} for x in p["models"]]})
        for m, params in ORDER_METHODS.items()}


def _same_tensor_bytes(got, want):
    files = sorted(f.name for f in want.glob("*.safetensors"))
    assert files and files == sorted(f.name for f in got.glob("*.safetensors"))
    for f in files:
        assert (got / f).read_bytes() == (want / f).read_bytes(), (got, f)


def test_a_shuffled_order_gives_the_same_bytes(tmp_path, monkeypatch):
    import random

    import fastmerge
    from fastmerge.pipeline import driver
    cases = _order_cases(tmp_path)
    for method, cfg in cases.items():
        fastmerge.merge_checkpoints(str(cfg), tmp_path / f"{method}_out", seed=7,
                                    shard_size="20KB")
    rng = random.Random(5)
    monkeypatch.setattr(driver, "processing_order",
                        lambda names, *_: rng.sample(list(names), len(names)))
    for method, cfg in cases.items():
        fastmerge.merge_checkpoints(str(cfg), tmp_path / f"{method}_shuffled", seed=7,
                                    shard_size="20KB")
        _same_tensor_bytes(tmp_path / f"{method}_shuffled", tmp_path / f"{method}_out")


ORDER_WORKER = """
import json, random, sys, zlib
from datetime import timedelta
import torch.distributed as dist
dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=120))
import fastmerge
from fastmerge.pipeline import driver
rank = dist.get_rank()
# each rank sees other sizes, so a largest-first order differs between the ranks
driver._Passes.in_bytes = lambda self, name: random.Random(
    zlib.crc32(name.encode()) + 1000 * rank).randrange(1, 1 << 20)
for cfg, out in json.loads(open(sys.argv[1]).read()):
    fastmerge.merge_checkpoints(cfg, out, shard_size="20KB", seed=7, quiet=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_torchrun_ranks_in_different_orders_give_the_single_process_bytes(tmp_path):
    """Each rank orders its tensors by other (random) sizes: the split tensors' reductions
    still pair up, and the output is the single-process merge's."""
    from test_distributed import _torchrun

    import fastmerge
    cases = _order_cases(tmp_path)
    jobs = []
    for method, cfg in cases.items():
        fastmerge.merge_checkpoints(str(cfg), tmp_path / f"{method}_1", seed=7,
                                    shard_size="20KB")
        jobs.append((str(cfg), str(tmp_path / f"{method}_2")))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "worker.py").write_text(ORDER_WORKER)
    r = _torchrun([str(tmp_path / "worker.py"), str(tmp_path / "jobs.json")], timeout=300,
                  FASTMERGE_SPLIT_BYTES="2000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for method in cases:
        _same_tensor_bytes(tmp_path / f"{method}_2", tmp_path / f"{method}_1")
