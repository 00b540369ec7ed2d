"""The torch-free chunked radix selection of CoreKernels (fastmerge._core.score_histogram and
fastmerge/planning/radix.py) against the radix selection of backend "cpu" (selection.py) and a
sort: the same thresholds and kept L1 over dtypes, sizes, chunkings, ties, all-zero and all-equal
tensors and the k edges, the same NaN/Inf error, the level-1 pass skipped only where level 0
pins the value, and ``fastmerge merge`` under a memory budget small enough to chunk the
selection never importing torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_util import cli_merge_without_torch, load_dir, write_yaml

import fastmerge
from fastmerge.abi import NUM_BINS, SCORE_MAGNITUDE
from fastmerge.backends import availability, get_backend
from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.pipeline import native
from fastmerge.planning.plan import BackendKernels
from fastmerge.planning.radix import HistTables, radix_select
from fastmerge.planning.selection import Chunk

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok or native._core() is None,
                                reason=f"cpu kernels or fastmerge._core unavailable: {why}")
if ok and native._core() is not None:
    from fastmerge.pipeline.core_kernels import BytesChunk, CoreKernels

ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def _sources(base, models, chunk):
    """The same chunking as byte chunks (CoreKernels) and torch chunks (backend cpu)."""
    numel = models[0].numel()
    ranges = [(s, min(s + chunk, numel)) for s in range(0, numel, chunk)] or [(0, 0)]

    def core_src():
        return [BytesChunk(_bytes(base[a:b]) if base is not None else None,
                           [_bytes(m[a:b]) for m in models],
                           ST[base.dtype] if base is not None else None,
                           [ST[m.dtype] for m in models], a, b - a) for a, b in ranges]

    def torch_src():
        return [Chunk(base[a:b] if base is not None else None, [m[a:b] for m in models], [], a)
                for a, b in ranges]
    return core_src, torch_src


def _requests(numel, n):
    ks = sorted({0, 1, 2, numel // 3, numel // 2, numel - 1, numel, numel + 5})
    return [(i, k) for i in range(n) for k in ks]


def _both(base, models, chunk, l1=True):
    """CoreKernels' selection (with the numel, as the planner calls it: level 1 of guessed bins
    in the level-0 read; and without: two reads) and backend "cpu"'s; the first two agree."""
    core_src, torch_src = _sources(base, models, chunk)
    numel = models[0].numel()
    reqs = _requests(numel, len(models))
    got = []
    for n in (numel, None):
        got.append(CoreKernels().radix(core_src, reqs, len(models), SCORE_MAGNITUDE, ("w",),
                                       None, l1, None, n))
    (sel, total), (sel2, total2) = got
    assert sel.thresholds == sel2.thresholds and sel.kept_l1 == sel2.kept_l1
    assert total == total2
    want, want_total = BackendKernels(get_backend("cpu", "cpu")).radix(
        torch_src, reqs, len(models), SCORE_MAGNITUDE, ("w",), None, l1)
    return reqs, sel, total, want, want_total


def _sorted_threshold(base, model, k):
    t = model.float() - (base.float() if base is not None else 0.0)
    a = t.abs().flatten().sort(descending=True).values
    if k <= 0:
        return float("inf")
    return 0.0 if k >= a.numel() else float(a[k - 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel,chunk", [(1, 4096), (7, 3), (4097, 4096), (30011, 7000),
                                         (65536, 65536)])
@pytest.mark.parametrize("with_base", [True, False])
def test_same_thresholds_and_l1_as_backend_cpu(dtype, numel, chunk, with_base):
    g = torch.Generator().manual_seed(numel)
    b32 = torch.randn(numel, generator=g)
    base = b32.to(dtype) if with_base else None
    models = [(b32 + 0.01 * torch.randn(numel, generator=g)).to(dtype) for _ in range(3)]
    models[2][: numel // 2] = models[2][numel // 2: 2 * (numel // 2)]   # repeated values: ties
    reqs, got, total, want, want_total = _both(base, models, chunk)
    assert got.thresholds == want.thresholds
    assert got.kept_l1 == want.kept_l1
    assert total == want_total
    for (i, k), thr in zip(reqs, got.thresholds):
        assert thr == _sorted_threshold(base, models[i], k), (i, k)


@pytest.mark.parametrize("case", ["zeros", "equal", "two_values"])
def test_degenerate_tensors(case):
    numel = 5000
    base = torch.zeros(numel, dtype=torch.bfloat16)
    if case == "zeros":
        models = [base.clone(), base.clone()]
    elif case == "equal":
        models = [torch.full((numel,), 0.5, dtype=torch.bfloat16)] * 2
    else:
        m = torch.full((numel,), 0.25, dtype=torch.bfloat16)
        m[::3] = -1.5
        models = [m, -m]
    reqs, got, total, want, want_total = _both(base, models, 1234)
    assert got.thresholds == want.thresholds and got.kept_l1 == want.kept_l1
    assert total == want_total
    for (i, k), thr in zip(reqs, got.thresholds):
        assert thr == _sorted_threshold(base, models[i], k), (i, k)


def test_without_l1():
    models = [torch.randn(9000, dtype=torch.float32) for _ in range(2)]
    _, got, total, want, _ = _both(None, models, 4000, l1=False)
    assert got.thresholds == want.thresholds
    assert got.kept_l1 is None and total is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raises_the_same_error(bad):
    base = torch.zeros(10000, dtype=torch.bfloat16)
    models = [torch.randn(10000).to(torch.bfloat16) for _ in range(2)]
    models[1][7777] = bad
    errors = []
    for kernels, src in zip((CoreKernels(), BackendKernels(get_backend("cpu", "cpu"))),
                            _sources(base, models, 3000)):
        with pytest.raises(ValueError) as e:
            kernels.radix(src, [(0, 10), (1, 10)], 2, SCORE_MAGNITUDE, ("w",), None, True)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert "model 1" in errors[0] and "1 NaN/Inf" in errors[0]


def _passes(base, models, chunk):
    core_src, _ = _sources(base, models, chunk)
    reqs = _requests(models[0].numel(), len(models))
    out = []
    for uniform in (True, False):
        acc = CoreKernels()._histogram(core_src)
        out.append(radix_select(len(models), reqs, acc, ("w",), True, None, uniform))
    (sel, total, passes), (sel2, total2, passes2) = out
    assert sel.thresholds == sel2.thresholds and sel.kept_l1 == sel2.kept_l1 and total == total2
    assert passes2 == 2
    return passes


def test_level0_alone_where_it_pins_the_values():
    """bf16 task vectors without a base (t = m: no low bits) are selected in one pass; float32
    values with low bits need the level-1 pass."""
    g = torch.Generator().manual_seed(3)
    bf = [torch.randn(20000, generator=g).to(torch.bfloat16) for _ in range(2)]
    assert _passes(None, bf, 6000) == 1
    f32 = [torch.randn(20000, generator=g) for _ in range(2)]
    assert _passes(None, f32, 6000) == 2


def _one_read_passes(base, models, chunk, density):
    core_src, _ = _sources(base, models, chunk)
    numel = models[0].numel()
    reqs = [(i, int(density * numel)) for i in range(len(models))]
    sel, _ = CoreKernels().radix(core_src, reqs, len(models), SCORE_MAGNITUDE, ("w",), None,
                                 True, None, numel)
    for (i, k), thr in zip(reqs, sel.thresholds):
        assert thr == _sorted_threshold(base, models[i], k)
    return sel.passes


def test_one_read_where_the_first_chunk_is_representative():
    g = torch.Generator().manual_seed(5)
    b = torch.randn(200000, generator=g)
    base = b.to(torch.bfloat16)
    models = [(b + 0.01 * torch.randn(200000, generator=g)).to(torch.bfloat16) for _ in range(3)]
    for density in (0.05, 0.2, 0.5):
        assert _one_read_passes(base, models, 50000, density) == 1


def test_a_wrong_guess_costs_a_second_read_only():
    """A first chunk unlike the rest (zeros) points level 1 at the wrong bins: still exact."""
    g = torch.Generator().manual_seed(6)
    models = [torch.randn(100000, generator=g) for _ in range(2)]
    for m in models:
        m[:30000] = 0.0
    assert _one_read_passes(None, models, 30000, 0.3) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_rows_equal_one_row_per_prefix(dtype):
    """score_histogram_windows (rows of several consecutive prefixes) bins what level-1 rows of
    score_histogram for each of those prefixes bin."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(20011, generator=g).to(dtype)
    models = [(base.float() + 0.05 * torch.randn(20011, generator=g)).to(dtype)
              for _ in range(2)]
    ch = _sources(base, models, 20011)[0]()[0]
    ck = CoreKernels()
    bits = [((m.float() - base.float()).abs().view(torch.int32) >> 16) for m in models]
    rows = np.array([[0, int(bits[0].median()) - 2], [1, int(bits[1].median())]], dtype=np.int64)
    widths = [5, 3]
    wc = np.zeros(8 * NUM_BINS, dtype=np.int64)
    ws = np.zeros(8 * NUM_BINS, dtype=np.float64)
    ck._windows_chunk(ch, rows, widths, wc, ws)
    single = np.array([[m, p + j] for (m, p), w in zip(rows.tolist(), widths) for j in range(w)],
                      dtype=np.int64)
    t = HistTables.zeros(len(single))
    ck._histogram_chunk(ch, single, 1, t)
    assert np.array_equal(wc.reshape(-1, NUM_BINS), t.counts)
    assert np.array_equal(ws.reshape(-1, NUM_BINS), t.sums)
    assert wc.sum() > 0


# ------------------------------------------------- fastmerge merge with a chunked selection
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Tensors of 128 x 256 = 32768 elements: more than one chunk under BUDGET."""
    return make_synthetic_checkpoints(tmp_path_factory.mktemp("wide"), n_models=3, layers=1,
                                      hidden=128, inter=256, vocab=64, shards=1)


def _cfg(p, method, shared=None, **params):
    models = [{"model": str(m), "parameters": {"weight": w, "density": 0.4, **params}}
              for m, w in zip(p["models"], (0.5, 0.3, 0.4))]
    cfg = {"merge_method": method, "base_model": str(p["base"]), "models": models}
    if shared:
        cfg["parameters"] = shared
    return cfg


def _small_budget(chunk: int = 5000) -> str:
    """A budget whose chunks hold about ``chunk`` elements in the costliest case here (a band,
    float32 inputs and output) on this machine's kernel threads: the tensors of ``wide`` are
    split into more than two chunks (two would be read whole for the one-pass top-k) whatever
    the machine's core count (the histograms' fixed part grows with it)."""
    from fastmerge.pipeline.budget import plan_chunking
    c = plan_chunking(2 ** 30, "cpu", 3, 4 * 4, 4, sparsifier="band")
    return str(c.fixed + c.bytes_per_elem * chunk)


BUDGET = _small_budget()


@pytest.mark.parametrize("method,params", [("ties", {}), ("breadcrumbs_ties", {"gamma": 0.05}),
                                           ("ties", {"shared": {"rescale": "l1"}}),
                                           ("magnitude_prune", {})])
def test_chunked_selection_runs_on_core(wide, tmp_path, monkeypatch, method, params):
    """Under a small budget the top-k tensors are split into chunks; their selection runs on
    _core (never delegated to torch) and the output is the engine's byte for byte."""
    cfg = _cfg(wide, method, **params)
    seen = []
    radix = CoreKernels.radix

    def counted(self, *a, **k):
        seen.append(1)
        return radix(self, *a, **k)

    def no_torch(self):
        raise AssertionError("CoreKernels delegated to torch")
    monkeypatch.setattr(CoreKernels, "radix", counted)
    monkeypatch.setattr(CoreKernels, "torch", no_torch)
    res = native.merge(cfg, tmp_path / "out", memory_budget=BUDGET)
    assert res.chunk_elems < 128 * 256
    assert seen
    want = fastmerge.merge_checkpoints(cfg, tmp_path / "engine", backend="cpu",
                                       memory_budget=BUDGET)
    a, b = load_dir(res.output_dir), load_dir(want.output_dir)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n].view(torch.uint8) if a[n].dtype != torch.int64 else a[n],
                           b[n].view(torch.uint8) if b[n].dtype != torch.int64 else b[n]), n


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_cli_chunked_selection_without_torch(wide, tmp_path, method):
    yml = write_yaml(tmp_path / "m.yml", _cfg(wide, method))
    r = cli_merge_without_torch(yml, tmp_path / "out", f"--memory-budget={BUDGET}")
    assert r.returncode == 0, r.stderr
    want = fastmerge.merge_checkpoints(_cfg(wide, method), tmp_path / "engine", backend="cpu",
                                       memory_budget=BUDGET)
    got = load_dir(tmp_path / "out")
    ref = load_dir(want.output_dir)
    assert got.keys() == ref.keys()
    for n in got:
        assert np.array_equal(got[n].view(torch.uint8).numpy() if got[n].is_floating_point()
                              else got[n].numpy(),
                              ref[n].view(torch.uint8).numpy() if ref[n].is_floating_point()
                              else ref[n].numpy()), n
