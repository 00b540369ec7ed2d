"""pytest-benchmark timings of the C++ CPU backend (skipped by default: the suite's addopts has
--benchmark-skip). Run: pytest benchmarks/test_bench_cpu.py --benchmark-only
The full table against peft / mergekit with the bandwidth model is benchmarks/bench_cpu.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cpu import make_inputs, run_mergekit, run_peft  # noqa: E402

import fastmerge as fm  # noqa: E402
from fastmerge.backends import availability, get_backend  # noqa: E402
from fastmerge.methods import resolve_spec  # noqa: E402
from fastmerge.planning.plan import plan_tensor  # noqa: E402
from fastmerge.planning.selection import Chunk  # noqa: E402

pytestmark = pytest.mark.skipif(not availability("cpu")[0], reason="cpu backend not built")
SHAPE = (2048, 2048)
NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module", params=[2, 3, 8], ids=lambda n: f"N{n}")
def inputs(request):
    return make_inputs(SHAPE, request.param)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "breadcrumbs_ties",
                                    "consensus_ties"])
def test_cpu_full_merge(benchmark, inputs, method):
    base, models = inputs
    params = {} if method == "task_arithmetic" else dict(density=0.2)
    benchmark(lambda: fm.merge_tensors(base, models, method, backend="cpu", tensor_name=NAME,
                                       **params))


def test_cpu_merge_pass_only(benchmark, inputs):
    base, models = inputs
    be = get_backend("cpu", "cpu")
    chunk = Chunk(base, models, [], 0, NAME)
    plan = plan_tensor(resolve_spec("ties", len(models), density=0.2), lambda: [chunk], be,
                       base.numel(), NAME)
    benchmark(lambda: be.merge(chunk, plan, torch.bfloat16))


def test_torch_backend_ties(benchmark, inputs):
    base, models = inputs
    benchmark(lambda: fm.merge_tensors(base, models, "ties", density=0.2, backend="torch",
                                       tensor_name=NAME))


def test_peft_ties(benchmark, inputs):
    pytest.importorskip("peft")
    base, models = inputs
    benchmark(lambda: run_peft(base, models, 0.2))


def test_mergekit_ties(benchmark, inputs):
    pytest.importorskip("mergekit")
    base, models = inputs
    benchmark(lambda: run_mergekit(base, models, 0.2))
