"""The merge pass's order (driver.processing_order): largest tensors first, ties in output
order, so the run ends on small tensors; the output and the NaN/Inf record do not depend on it."""
from __future__ import annotations

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
