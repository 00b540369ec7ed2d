"""The memory budget holds on a checkpoint several times larger than the budget: peak RSS
of a child process, measured against its own baseline just before merging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import fastmerge
from fastmerge.cli.demo import make_synthetic_checkpoints

REPO = Path(__file__).resolve().parents[1]
BUDGET = 32 * 2 ** 20

CHILD = textwrap.dedent("""
    import json, sys
    NATIVE = sys.argv[4] == "native"   # fastmerge merge's torch-free path
    if NATIVE:
        from fastmerge.pipeline import load_config, native
        merge = lambda cfg, out, **kw: native.merge_natively(load_config(cfg), out, **kw)
    else:
        import torch, fastmerge
        merge = lambda cfg, out, **kw: fastmerge.merge_checkpoints(cfg, out, backend=sys.argv[4],
                                                                   **kw)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    cfg, out, budget, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[5]
    # the baseline: the interpreter after one tiny merge (imports, thread pools, kernels);
    # then the high-water mark is reset (clear_refs 5) so it measures the big merge alone
    merge(warm, out + "-warm")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = status("VmRSS")
    res = merge(cfg, out, memory_budget=budget)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "chunk": res.chunk_elems,
                      "bytes_in": res.bytes_in, "torch": "torch" in sys.modules}))
""")



@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.slow
@pytest.mark.parametrize("path", ["engine", "native"])
def test_peak_rss_stays_under_the_budget(tmp_path, path):
    """engine: ties (chunked radix selection, then the merge) on the C++ backend when built;
    task arithmetic on the slow torch backend otherwise (keeps the test fast). native (what
    ``fastmerge merge`` runs on the CPU, without torch): dare_ties, its statistics pass and
    merge over row chunks of mapped inputs."""
    from fastmerge.backends import availability
    from fastmerge.pipeline import native
    backend = "cpu" if availability("cpu")[0] else "torch"
    method = "ties" if backend == "cpu" else "task_arithmetic"
    if path == "native":
        if native._core() is None:
            pytest.skip("fastmerge._core is not built")
        backend, method = "native", "dare_ties"
    p = make_synthetic_checkpoints(tmp_path / "in", n_models=2, layers=2, hidden=1024,
                                   inter=2816, vocab=2000, shards=2,
                                   only=("up_proj", "down_proj"))
    size = sum(f.stat().st_size for d in [p["base"], *p["models"]]
               for f in d.glob("*.safetensors"))
    assert size > 2.5 * BUDGET
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": method, "base_model": str(p["base"]), "parameters": {"normalize": False},
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
                   for m in p["models"]]}))
    small = make_synthetic_checkpoints(tmp_path / "small", n_models=2, layers=1, hidden=32,
                                       inter=48, vocab=64, shards=1)
    warm = tmp_path / "warm.yml"
    warm.write_text(yaml.safe_dump({
        "merge_method": method, "base_model": str(small["base"]),
        "models": [{"model": str(m), "parameters": {"density": 0.5}} for m in small["models"]]}))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(tmp_path / "out"),
                        str(BUDGET), backend, str(warm)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["baseline"]
    print(f"peak RSS growth {grew / 2 ** 20:.1f} MiB, budget {BUDGET / 2 ** 20:.0f} MiB, input "
          f"{size / 2 ** 20:.0f} MiB, chunk {m['chunk']} elements, backend {backend}")
    # the largest tensor (up_proj, 2816 x 1024) is split into row chunks
    assert m["chunk"] < 2816 * 1024
    assert grew <= BUDGET, f"peak RSS grew {grew / 2 ** 20:.1f} MiB over a " \
                           f"{BUDGET / 2 ** 20:.0f} MiB budget ({size / 2 ** 20:.0f} MiB input)"
    assert m["torch"] == (path == "engine")
    if path == "native":   # the engine's output, byte for byte
        want = fastmerge.merge_checkpoints(str(cfg), tmp_path / "engine", backend="cpu",
                                           memory_budget=BUDGET)
        for f in sorted((tmp_path / "out").iterdir()):
            assert f.read_bytes() == (want.output_dir / f.name).read_bytes(), f.name
        return
    from safetensors import safe_open
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    with safe_open(str(tmp_path / "out" / idx["weight_map"][name]), "pt") as f:
        got = f.get_tensor(name)
    from engine_util import load_dir

    from fastmerge.api import merge_tensors
    want = merge_tensors(load_dir(p["base"])[name], [load_dir(x)[name] for x in p["models"]],
                         method, weights=[0.5, 0.5], density=0.5, normalize=False,
                         tensor_name=name, backend=backend)
    assert torch.equal(got, want)


def _probe():
    """benchmarks/memory_probe.py (its inputs, configs and child process)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("memory_probe",
                                                  REPO / "benchmarks" / "memory_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PROBE_BUDGET = 64 * 2 ** 20
# a top-k and a band selection over 3 chunks (radix with guessed level-1 tables), DARE's L1
# statistics pass, della's masks, a Gram pre-pass: the paths whose scratch the budget counts;
# sce's float32 reference (Method.work_bytes) and .bin chunk copies (heaps trimmed per tensor)
PROBE_CASES = [("ties", "bf16"), ("breadcrumbs_ties", "mixed"), ("dare_ties", "bf16"),
               ("della", "mixed"), ("slerp", "bf16"), ("sce", "bf16"), ("ties", "bin")]


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory):
    from fastmerge.pipeline import native
    if native._core() is None:
        pytest.skip("fastmerge._core is not built")
    probe = _probe()
    root = tmp_path_factory.mktemp("probe")
    shape = dict(probe.SHAPE, layers=1)
    return probe, root, {k: (probe.make_inputs(root / k, k, shape),
                             probe.warm_inputs(root / k, k)) for k in ("bf16", "mixed", "bin")}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("method,kind", PROBE_CASES)
def test_the_compiled_kernels_peak_stays_within_the_budget(probe_inputs, method, kind):
    """fastmerge merge's path (budget.work_bytes_per_element of the compiled kernels) on
    2816x1024 tensors of several chunks at a 64 MiB budget: peak RSS growth within it."""
    probe, root, inputs = probe_inputs
    got = probe.measure(root, method, kind, PROBE_BUDGET, *inputs[kind])
    assert "error" not in got, got.get("error")
    assert got["chunk"] < 2816 * 1024   # several chunks
    assert got["grew"] <= PROBE_BUDGET, \
        f"{method} ({kind}): peak RSS grew {got['grew'] / 2 ** 20:.1f} MiB over a 64 MiB budget"


def test_llama_7b_mlp_matrices_are_one_chunk_at_2_gib():
    """A bf16 base + 2 fine-tunes at 2 GiB on the compiled kernels: every 4096x11008 matrix is
    one chunk (read once), for a top-k and a band selection too; the window tables a chunked
    selection guesses, with each kernel thread's own counts, stay within its scratch."""
    from fastmerge.pipeline.budget import (
        TABLE_BYTES,
        THREAD_TABLE_BYTES,
        plan_chunking,
        selection_window_rows,
    )
    for sparsifier in ("none", "dare", "topk", "band"):
        for threads in (1, 16, 64):
            c = plan_chunking(2 << 30, "cpu", 2, 3 * 2, 2, sparsifier=sparsifier,
                              threads=threads)
            assert c.chunk_elems >= 4096 * 11008, (sparsifier, threads)
            rows = selection_window_rows(2, c.chunk_elems, threads, c.work)
            assert rows * (TABLE_BYTES + threads * THREAD_TABLE_BYTES) <= \
                4 * TABLE_BYTES + c.work * c.chunk_elems
    # mergekit's methods keep the allowance their float32 reference was measured under
    c = plan_chunking(2 << 30, "cpu", 2, 3 * 2, 2, sparsifier="none", combine="mergekit")
    assert c.work == 8 * (2 + 2)
