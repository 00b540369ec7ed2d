"""How the merge pass reads a tensor split into chunks (pipeline/driver.py, _TensorChunks): a
method with a pre-pass (dare_ties' L1 statistics, ties' selection) reads each chunk twice,
once from disk on the reader thread and once more, from the page cache, on its own thread;
the next tensor's first chunk is read while this tensor's last chunk and later pass are
computed; at most three chunks are loaded at once, as budget.plan_chunking counts; the output
is the unchunked merge's, byte for byte."""
from __future__ import annotations

import threading
import weakref
from pathlib import Path

import pytest
import torch
from engine_util import load_dir, write_yaml

from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.pipeline import load_config, native
from fastmerge.pipeline.budget import element_ranges
from fastmerge.pipeline.core_kernels import CoreKernels

pytestmark = pytest.mark.skipif(native._core() is None, reason="fastmerge._core is not built")
CHUNK = 1100  # elements: embed_tokens/lm_head (64 x 32) and the MLP matrices (48 x 32) split,
#              the attention matrices (32 x 32) whole


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_synthetic_checkpoints(tmp_path_factory.mktemp("ahead"), n_models=2, layers=2,
                                      hidden=32, inter=48, vocab=64, shards=1)


def _cfg(p, method):
    params = {"weight": 0.5} if method == "task_arithmetic" else {"weight": 0.5, "density": 0.5}
    return {"merge_method": method, "base_model": str(p["base"]), "dtype": "bfloat16",
            "models": [{"model": str(m), "parameters": params} for m in p["models"]]}


class Recorder:
    """Every CoreKernels.load: (thread, tensor, start, stop) in call order, and how many
    elements the loaded chunks alive held at most."""

    def __init__(self, monkeypatch):
        self.calls, self.alive, self.most = [], 0, 0
        self.lock = threading.Lock()
        load = CoreKernels.load

        def recorded(kernels, name, start, stop, only_reference=False):
            ch = load(kernels, name, start, stop, only_reference)
            with self.lock:
                self.calls.append((threading.current_thread().name, name, start, stop))
                self.alive += stop - start
                self.most = max(self.most, self.alive)
            weakref.finalize(ch, self.released, stop - start)
            return ch
        monkeypatch.setattr(CoreKernels, "load", recorded)

    def released(self, numel):
        with self.lock:
            self.alive -= numel


def _merge(tmp_path, ckpts, method, out, **kw):
    cfg = load_config(write_yaml(tmp_path / f"{out}.yml", _cfg(ckpts, method)))
    return native.merge_natively(cfg, tmp_path / out, **kw)


@pytest.mark.parametrize("method", ["dare_ties", "ties", "task_arithmetic"])
def test_a_chunked_tensors_reads_and_their_threads(ckpts, tmp_path, monkeypatch, method):
    """On the reader thread, each chunk once (ties: the first chunk, read ahead, then the
    whole tensor for the one-pass top-k); on the re-reader, the merge pass's chunks where a
    pre-pass read them first; never on the main thread."""
    rec = Recorder(monkeypatch)
    radix = []
    monkeypatch.setattr(CoreKernels, "radix", lambda *a, **k: radix.append(1))
    res = _merge(tmp_path, ckpts, method, "out", max_chunk_elems=CHUNK)
    assert res.chunk_elems == CHUNK and not radix
    shapes = {name: tuple(t.shape) for name, t in load_dir(ckpts["base"]).items()}
    by_thread: dict = {}
    for thread, name, start, stop in rec.calls:
        by_thread.setdefault(thread.split("_")[0], {}).setdefault(name, []).append(
            (start, stop))
    assert set(by_thread) == ({"fastmerge-read"} if method == "task_arithmetic" else
                              {"fastmerge-read", "fastmerge-reread"})
    chunked = {name for name, units in by_thread["fastmerge-read"].items()
               if any(start > 0 for start, _ in units) or len(units) > 1}
    assert len(chunked) == 2 + 2 * 3          # embed_tokens, lm_head, 3 MLP matrices a layer
    for name, units in by_thread["fastmerge-read"].items():
        if name not in chunked:
            assert len(units) == 1, name
            continue
        chunks = element_ranges(shapes[name], CHUNK)
        numel = chunks[-1][1]
        assert len(chunks) == 2, name
        assert units == ([chunks[0], (0, numel)] if method == "ties" else chunks), name
        if method != "task_arithmetic":
            assert by_thread["fastmerge-reread"][name] == chunks, name
    assert rec.most <= 3 * CHUNK      # as budget.plan_chunking counts: 3 chunks loaded


@pytest.mark.parametrize("method", ["dare_ties", "ties", "task_arithmetic"])
def test_the_next_tensor_is_read_during_the_last_chunk(ckpts, tmp_path, monkeypatch, method):
    """On the reader thread, each tensor's first chunk comes right after the last chunk of
    the tensor before (no read of that tensor's later pass between them)."""
    rec = Recorder(monkeypatch)
    _merge(tmp_path, ckpts, method, "out", max_chunk_elems=CHUNK)
    first = [(name, start, stop) for t, name, start, stop in rec.calls
             if t.startswith("fastmerge-read_")]
    assert len(first) == len(set(first))           # the reader reads each unit once
    names = [name for name, _, _ in first]
    runs = [names[0]] + [b for a, b in zip(names, names[1:]) if a != b]
    assert len(runs) == len(set(runs))             # tensor after tensor, never back
    for a, b in zip(first, first[1:]):
        if a[0] != b[0]:
            assert b[1] == 0


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_chunked_output_is_the_unchunked_one(ckpts, tmp_path, method):
    _merge(tmp_path, ckpts, method, "whole")
    _merge(tmp_path, ckpts, method, "chunked", max_chunk_elems=CHUNK)
    whole, chunked = load_dir(tmp_path / "whole"), load_dir(tmp_path / "chunked")
    assert whole.keys() == chunked.keys()
    for name, t in whole.items():
        assert t.dtype == chunked[name].dtype, name
        assert t.flatten().view(torch.uint8).equal(chunked[name].flatten().view(torch.uint8)), name


@pytest.mark.parametrize("method", ["dare_ties", "ties", "task_arithmetic"])
def test_the_next_read_starts_before_the_last_merge_of_a_chunked_tensor(ckpts, tmp_path,
                                                                         monkeypatch, method):
    """When the last chunk of a tensor of several is merged, the next tensor's first chunk is
    being read already (here: its read starts within 10 s, while that merge waits)."""
    started, cond = [], threading.Condition()
    load, merge = CoreKernels.load, CoreKernels.merge
    n_tensors = len(load_dir(ckpts["base"]))

    def recorded(kernels, name, start, stop, only_reference=False):
        with cond:
            if name not in started:
                started.append(name)
                cond.notify_all()
        return load(kernels, name, start, stop, only_reference)

    late = []

    def merged(kernels, ch, plan, out_st, slot):
        name = plan.tensor_name
        last = ch.offset > 0 and ch.offset + ch.numel == kernels.inputs.reference.info(
            name).numel
        if last and len(started) < n_tensors:
            with cond:
                if not cond.wait_for(lambda: started[-1] != name, timeout=10):
                    late.append(name)
        return merge(kernels, ch, plan, out_st, slot)
    monkeypatch.setattr(CoreKernels, "load", recorded)
    monkeypatch.setattr(CoreKernels, "merge", merged)
    _merge(tmp_path, ckpts, method, "out", max_chunk_elems=CHUNK)
    assert len(started) == n_tensors and not late


def test_only_tensors_of_two_chunks_are_read_whole(ckpts, tmp_path, monkeypatch):
    """ties at 600 elements a chunk: the attention matrices (2 chunks) take the one-pass top-k
    on the whole tensor, the MLP matrices and embeddings (3-4 chunks) the radix selection."""
    radix, whole = [], []
    got = CoreKernels.radix

    def counted(kernels, source, *a, **k):
        radix.append(a[3][0])
        return got(kernels, source, *a, **k)
    monkeypatch.setattr(CoreKernels, "radix", counted)
    one = CoreKernels.one_pass

    def one_pass(kernels, source, *a, **k):
        chunks = source()
        if isinstance(chunks, list) and a[2] > 600:
            whole.append(a[4][0])
        return one(kernels, lambda: chunks, *a, **k)
    monkeypatch.setattr(CoreKernels, "one_pass", one_pass)
    _merge(tmp_path, ckpts, "ties", "out", max_chunk_elems=600)
    shapes = {name: tuple(t.shape) for name, t in load_dir(ckpts["base"]).items()}
    n_chunks = {name: len(element_ranges(s, 600)) for name, s in shapes.items()}
    assert whole and radix
    assert sorted(whole) == sorted(x for x, c in n_chunks.items() if c == 2)
    assert sorted(radix) == sorted(x for x, c in n_chunks.items() if c > 2)


def test_the_whole_tensor_is_offered_only_to_a_score_the_one_pass_takes():
    """ffg's Fisher score has no one-pass top-k: the planner must not hand the kernels the
    whole tensor (a wasted read of two chunks and their second moments) before the radix."""
    from fastmerge.methods import resolve_spec
    from fastmerge.planning.planner import select_thresholds

    class Done(Exception):
        pass

    class Kernels:
        def one_pass(self, source, *a):
            source()   # as CoreKernels / BackendKernels: the source first, the score after
            return None

        def radix(self, *a, **k):
            raise Done

    def src():
        return iter(())
    whole = []
    src.whole = lambda: whole.append(1) or []
    for method in ("ffg", "ties"):
        with pytest.raises(Done):
            select_thresholds(resolve_spec(method, 2, density=0.5), 100, Kernels(), src,
                              ("t",), l1=False)
    assert whole == [1]   # ties' magnitude only


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
@pytest.mark.parametrize("at", [2, 5])
def test_an_interrupt_mid_tensor_leaves_no_thread_mapping_or_output(ckpts, tmp_path,
                                                                     monkeypatch, method, at):
    """Ctrl-C (or SIGTERM, which the writer turns into the same exception) while a chunked
    tensor is merged, the next one read ahead and its re-read pending: the reader threads are
    joined, no input stays mapped, no output directory is left."""
    import gc
    merge = CoreKernels.merge
    calls = []

    def interrupted(kernels, *a, **k):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return merge(kernels, *a, **k)
    monkeypatch.setattr(CoreKernels, "merge", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _merge(tmp_path, ckpts, method, "out", max_chunk_elems=CHUNK)
    gc.collect()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fastmerge-")]
    maps = Path("/proc/self/maps")
    if maps.exists():   # Linux: the process's mappings
        assert not [ln for ln in maps.read_text().splitlines()
                    if str(ckpts["base"].parent) in ln]
    assert not (tmp_path / "out").exists()
