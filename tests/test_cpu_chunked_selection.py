"""Backend "cpu"'s selection of a tensor of several chunks in one read (selection.select_one_read:
radix.py's radix_select_one_read fed by fastmerge._C's histogram ops, the algorithm the
torch-free CoreKernels run): the same thresholds and kept L1 as its two-read radix selection,
CoreKernels and the reference over dtypes, 2-5 chunks, models, ties at chunk boundaries,
all-zero and all-equal tensors, the k edges and bands; the reads it makes (1 where the first
chunk predicts the k-th bins, 2 where not), merges within the reference's tolerance, and a
checkpoint merge under a small budget reading each chunked top-k tensor twice (selection +
merge) instead of three times, with the same bytes."""
from __future__ import annotations

import pytest
import torch
from engine_util import load_dir
from helpers import make_finetunes

import fastmerge
from fastmerge import reference
from fastmerge.abi import SCORE_MAGNITUDE
from fastmerge.backends import availability, get_backend
from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.methods import resolve_spec
from fastmerge.pipeline import native
from fastmerge.planning.plan import BackendKernels, plan_tensor
from fastmerge.planning.selection import Chunk
from fastmerge.testing import assert_matches_reference, reference_masks

ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu kernels unavailable: {why}")

# (numel, chunk): 2, 3, 3, 4 and 5 chunks, tails of one element included
SPLITS = [(10000, 5000), (7, 3), (4097, 2048), (12289, 4096), (30011, 7000)]


def _source(base, models, chunk, reads=None):
    """The tensor in chunks of ``chunk`` elements, yielded one by one as the pipeline does;
    ``reads`` (a list) gets one entry per pass that reads any chunk."""
    numel = models[0].numel()
    ranges = [(a, min(a + chunk, numel)) for a in range(0, numel, chunk)]

    def src():
        for j, (a, b) in enumerate(ranges):
            if j == 0 and reads is not None:
                reads.append(1)
            yield Chunk(base[a:b] if base is not None else None, [m[a:b] for m in models], [], a)
    return src


def _cpu():
    return BackendKernels(get_backend("cpu", "cpu"))


def _select(kernels, src, reqs, n, numel, l1=True):
    return kernels.radix(src, reqs, n, SCORE_MAGNITUDE, ("w",), None, l1, None, numel)


def _ref_threshold(base, model, k):
    t = reference.task_vectors(base, [model], torch.float32)[0]
    return reference.magnitude_threshold(t.abs(), k)


def _requests(base, models):
    """k edges and, per model, every k around a tie: the first and last rank of each value
    held by several elements (near the chunk boundaries among them)."""
    numel = models[0].numel()
    out = []
    for i, m in enumerate(models):
        ks = {0, 1, numel // 3, numel - 1, numel, numel + 3}
        a = reference.task_vectors(base, [m], torch.float32)[0].abs().flatten()
        _, counts = torch.unique(a, return_counts=True)
        above = counts.flip(0).cumsum(0).flip(0) - counts   # elements above each value
        tied = [(c, ab) for c, ab in zip(counts.tolist(), above.tolist()) if c > 1]
        for c, ab in tied[-1:] + tied[len(tied) // 2: len(tied) // 2 + 1]:   # top, middle
            ks.update({ab, ab + 1, ab + c})
        out += [(i, k) for k in sorted(ks)]
    return out


def _check_all(base, models, chunk, l1=True, with_torch=False):
    numel, n = models[0].numel(), len(models)
    reqs = _requests(base, models)
    reads = []
    sel, total = _select(_cpu(), _source(base, models, chunk, reads), reqs, n, numel, l1)
    assert sel.passes == len(reads) and sel.passes in (1, 2)
    two, total2 = _select(_cpu(), _source(base, models, chunk), reqs, n, None, l1)  # 2 reads
    assert sel.thresholds == two.thresholds and sel.kept_l1 == two.kept_l1 and total == total2
    for (i, k), thr in zip(reqs, sel.thresholds):
        assert thr == _ref_threshold(base, models[i], k), (i, k)
    if with_torch:   # the plain-torch backend (slow here): no window op, still two reads
        pure, _ = _select(BackendKernels(get_backend("torch", "cpu")),
                          _source(base, models, chunk), reqs, n, numel, l1)
        assert pure.thresholds == sel.thresholds and pure.passes is None
    core = native._core()
    if core is not None:
        from test_core_selection import _sources

        from fastmerge.pipeline.core_kernels import CoreKernels
        got = _select(CoreKernels(), _sources(base, models, chunk)[0], reqs, n, numel, l1)
        assert got[0].thresholds == sel.thresholds and got[0].kept_l1 == sel.kept_l1
        assert got[1] == total and got[0].passes == sel.passes
    return sel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel,chunk", SPLITS)
@pytest.mark.parametrize("n,with_base", [(1, True), (3, True), (2, False), (5, True)])
def test_same_as_two_reads_core_and_reference(dtype, numel, chunk, n, with_base):
    g = torch.Generator().manual_seed(numel + n)
    b32 = torch.randn(numel, generator=g)
    base = b32.to(dtype) if with_base else None
    models = [(b32 + 0.01 * torch.randn(numel, generator=g)).to(dtype) for _ in range(n)]
    # |t| = 0.5 (the largest) on both sides of each chunk boundary: ties split by the chunks
    for a in range(chunk, numel, chunk):
        r = slice(max(a - 20, 0), a + 20)
        if base is not None:
            base[r] = 0.0
        for m in models:
            m[r] = 0.5
    _check_all(base, models, chunk, with_torch=n == 3 and dtype == torch.bfloat16)


@pytest.mark.parametrize("case", ["zeros", "equal", "two_values", "coarse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_degenerate_tensors(case, dtype):
    numel = 9001
    base = torch.zeros(numel, dtype=dtype)
    if case == "zeros":
        models = [base.clone(), base.clone()]
    elif case == "equal":
        models = [torch.full((numel,), 0.5, dtype=dtype)] * 2
    elif case == "two_values":
        m = torch.full((numel,), 0.25, dtype=dtype)
        m[::3] = -1.5
        models = [m, -m]
    else:   # a few values, each held by many elements in every chunk
        g = torch.Generator().manual_seed(4)
        models = [(torch.randint(-6, 7, (numel,), generator=g) / 8).to(dtype) for _ in range(3)]
    _check_all(base, models, 2500, with_torch=dtype == torch.bfloat16)


def test_without_l1():
    models = [torch.randn(9000, dtype=torch.float32) for _ in range(2)]
    sel = _check_all(None, models, 4000, l1=False)
    assert sel.kept_l1 is None


def test_reads_one_when_predicted_two_when_not():
    g = torch.Generator().manual_seed(5)
    b = torch.randn(200000, generator=g)
    base = b.to(torch.bfloat16)
    models = [(b + 0.01 * torch.randn(200000, generator=g)).to(torch.bfloat16) for _ in range(3)]
    for ks in ((10000,), (40000,), (100000,), (10000, 60000)):   # the last: a band
        reqs = [(i, k) for i in range(3) for k in ks]
        reads = []
        sel, _ = _select(_cpu(), _source(base, models, 50000, reads), reqs, 3, 200000)
        assert len(reads) == sel.passes == 1, ks
        for (i, k), thr in zip(reqs, sel.thresholds):
            assert thr == _ref_threshold(base, models[i], k)
    # a first chunk unlike the rest (zeros) points level 1 at the wrong bins: a second read
    ms = [torch.randn(100000, generator=g) for _ in range(2)]
    for m in ms:
        m[:30000] = 0.0
    reqs = [(i, 30000) for i in range(2)]
    reads = []
    sel, _ = _select(_cpu(), _source(None, ms, 30000, reads), reqs, 2, 100000)
    assert len(reads) == sel.passes == 2
    for (i, k), thr in zip(reqs, sel.thresholds):
        assert thr == _ref_threshold(None, ms[i], k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_raises_the_two_read_error(bad):
    base = torch.zeros(10000, dtype=torch.bfloat16)
    models = [torch.randn(10000).to(torch.bfloat16) for _ in range(2)]
    models[1][7777] = bad
    errors = []
    for numel in (10000, None):
        with pytest.raises(ValueError) as e:
            _select(_cpu(), _source(base, models, 3000), [(0, 10), (1, 10)], 2, numel)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "model 1" in errors[0]


@pytest.mark.parametrize("method,params", [
    ("ties", dict(density=[0.2, 0.0, 1.0])),
    ("ties", dict(density=0.3, rescale="l1")),
    ("magnitude_prune", dict(density=[0.5, 0.01, 0.9])),
    ("breadcrumbs", dict(density=[0.3, 0.1, 1.0], gamma=[0.05, 0.0, 0.2])),
    ("breadcrumbs_ties", dict(density=0.4, gamma=0.1)),
])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_chunked_plan_and_merge_match_the_reference(method, params, dtype):
    """plan_tensor over 4 chunks on backend "cpu": the reference's thresholds and masks, one
    read for the selection, and the chunk-by-chunk merge within the reference's tolerance."""
    base, models, _ = make_finetunes((97, 131), 3, (dtype,), seed=11)
    numel = base.numel()
    spec = resolve_spec(method, 3, **params)
    be = get_backend("cpu", "cpu")
    flat = [m.reshape(-1) for m in models]
    reads = []
    plan = plan_tensor(spec, _source(base.reshape(-1), flat, 3300, reads), be, numel, "w")
    masks, used = reference_masks(base, models, method, tensor_name="w", **params)
    assert plan.info["thresholds"] == [(float(lo), float(hi)) for lo, hi in used]
    # rescale l1: the kept L1 comes with the selection; 2 reads where a guess missed (density
    # 0.01: the first chunk's 33rd largest is bracketed by more bins than a window holds)
    assert len(reads) == plan.passes and plan.passes in (1, 2)
    t = reference.task_vectors(base, models, torch.float32)
    for i, (lo, hi) in enumerate(plan.info["thresholds"]):
        keep = (t[i].abs() >= lo) & ((t[i].abs() < hi) | (hi == float("inf")))
        assert torch.equal(keep, masks[i])
    outs = [be.merge(c, plan, base.dtype)[0] for c in _source(base.reshape(-1), flat, 3300)()]
    assert_matches_reference(torch.cat(outs).reshape(base.shape), base, models, method,
                             tensor_name="w", **params)


# ------------------------------------------------- a checkpoint merge under a small budget
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """MLP tensors of 256 x 2048 elements: four chunks of 160,000 elements (a tensor of two
    is read whole for the one-pass top-k instead: pipeline/driver.py); the guessed level-1
    bins the budget allows (budget.selection_window_rows) may hold the k-th largest or miss."""
    return make_synthetic_checkpoints(tmp_path_factory.mktemp("wide"), n_models=3, layers=1,
                                      hidden=256, inter=2048, vocab=64, shards=1)


def _loads(monkeypatch):
    from fastmerge.pipeline.torch_kernels import TorchKernels
    seen: dict = {}
    real = TorchKernels.load

    def counted(self, name, start, stop, only_reference=False):
        seen.setdefault(name, []).append((start, stop))
        return real(self, name, start, stop, only_reference)
    monkeypatch.setattr(TorchKernels, "load", counted)
    return seen


def _budget_for_chunks(method: str, elems: int) -> int:
    """The budget whose chunks of a bf16 base + 3 models hold ``elems`` elements (the
    kernel threads' own histogram rows make the fixed part depend on the machine)."""
    from fastmerge.pipeline.budget import plan_chunking
    sparsifier = fastmerge.methods.METHODS[method].sparsifier
    one = plan_chunking(2 ** 30, "cpu", 3, 4 * 2, 2, sparsifier=sparsifier)
    return one.fixed + elems * one.bytes_per_elem


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_checkpoint_merge_reads_each_chunked_tensor_twice(wide, tmp_path, monkeypatch, method):
    from fastmerge import _C
    models = [{"model": str(m), "parameters": {"weight": w, "density": 0.4}}
              for m, w in zip(wide["models"], (0.5, 0.3, 0.4))]
    cfg = {"merge_method": method, "base_model": str(wide["base"]), "models": models}
    seen = _loads(monkeypatch)
    budget = _budget_for_chunks(method, 160_000)
    res = fastmerge.merge_checkpoints(cfg, tmp_path / "one", backend="cpu", memory_budget=budget)
    assert res.chunk_elems < 256 * 2048 / 2
    one = dict(seen)
    seen.clear()
    monkeypatch.setattr(_C, "score_histogram_windows", None)   # the two-read selection
    two_res = fastmerge.merge_checkpoints(cfg, tmp_path / "two", backend="cpu",
                                          memory_budget=budget)
    chunked = [n for n, r in one.items() if len(set(r)) > 2]
    assert chunked
    reads = {n: len(one[n]) // len(set(one[n])) for n in chunked}
    for n in chunked:
        # one selection read + the merge (a second selection read where a guess misses)
        assert len(one[n]) == reads[n] * len(set(one[n])) and reads[n] in (2, 3), n
        assert len(seen[n]) == 3 * len(set(seen[n])), n   # two selection reads + the merge
    # a band's two requests per model share the rows: narrower guesses; a top-k's guesses of
    # 2+ bins per model hit here (the budget's tables: fewer on a machine of many threads,
    # whose every kernel thread keeps its own counts of each table)
    from fastmerge.pipeline.budget import select_bytes, selection_window_rows
    rows = selection_window_rows(3, res.chunk_elems, torch.get_num_threads(),
                                 select_bytes("topk", 3))
    if method == "ties" and rows >= 2 * 3:
        assert set(reads.values()) == {2}
    a, b = load_dir(res.output_dir), load_dir(two_res.output_dir)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)), n


@pytest.mark.parametrize("max_rows", [1, 4, 12, 18, 30, None])
def test_window_rows_capped_and_still_exact(max_rows, monkeypatch):
    """``max_rows`` (the pipeline's budget.selection_window_rows) bounds the guessed level-1
    tables together with the pending requests' own level-1 tables; narrower guesses (none
    where fewer than 2 rows per request fit) may cost a second read, never a wrong
    threshold."""
    from fastmerge.planning import radix
    g = torch.Generator().manual_seed(8)
    b = torch.randn(60000, generator=g)
    base = b.to(torch.float16)
    models = [(b + 0.01 * torch.randn(60000, generator=g)).to(torch.float16) for _ in range(3)]
    rows = []
    real = radix.guess_windows

    def spy(*a):
        got = real(*a)
        rows.append(sum(got[1]))
        return got
    monkeypatch.setattr(radix, "guess_windows", spy)
    reqs = [(i, k) for i in range(3) for k in (600, 20000)]
    reads = []
    from fastmerge.planning.selection import select_one_read
    sel, _ = select_one_read(get_backend("cpu", "cpu"), _source(base, models, 17000, reads), 3,
                             reqs, 60000, ("w",), True, max_rows)
    if max_rows is not None and max_rows < 2 * len(reqs):
        assert rows == [] and sel.passes == 2
    else:
        assert rows[0] <= (16 * len(reqs) if max_rows is None else max_rows - len(reqs))
    assert len(reads) == sel.passes
    for (i, k), thr in zip(reqs, sel.thresholds):
        assert thr == _ref_threshold(base, models[i], k)
