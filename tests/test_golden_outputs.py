"""Golden outputs: the sha256 of every output tensor's bytes, for every method and each whole-
checkpoint path (the CLI's merge, ``merge_checkpoints`` on backends "torch" and "cpu"), on small
deterministic synthetic checkpoints, stored in tests/golden/<case>.json. A refactor of the
pipeline must leave them byte for byte as they are.

Cases cover every method, a multi-chunk tensor (``max_chunk_elems``), a top-k window miss (a
tensor whose sampled runs see only zeros, so csrc/cpu/select.cpp's window misses), ``scope:
model``, LiNeS (``alpha`` given and ``auto``), ``rescale: l1`` and output dtypes.

Regenerating (only when the output is meant to change, e.g. the DARE mask's semantics version):

    FASTMERGE_REGEN_GOLDEN=dare PYTHONPATH=. python -m pytest tests/test_golden_outputs.py -q

rewrites the golden files of the cases whose name contains one of the comma-separated words
("1" or "all": every case); then review the diff of tests/golden/ and commit it.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from engine_util import load_dir

import fastmerge
from fastmerge.backends import availability
from fastmerge.cli.demo import make_synthetic_checkpoints, save_checkpoint
from fastmerge.pipeline import native

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN_ENV = "FASTMERGE_REGEN_GOLDEN"
ok, why = availability("cpu")
pytestmark = pytest.mark.skipif(not ok or native._core() is None,
                                reason=f"cpu kernels or fastmerge._core unavailable: {why}")

MISS = "model.layers.0.mlp.up_proj.weight"   # (256, 512): sampled by runs, see miss_ckpts
W = (0.5, 0.3, 0.4)
D = (0.5, [0.9, 0.4], 0.7)                   # a gradient density for model 1


def _models(p, params, moments=False):
    out = []
    for i, m in enumerate(p["models"]):
        e = {"model": str(m), "parameters": dict(params[i])}
        if moments:
            e["preconditioner_path"] = str(p["moments"][i])
        out.append(e)
    return out


def _wd(keys=("weight", "density"), densities=D):
    vals = {"weight": W, "density": densities}
    return [{k: vals[k][i] for k in keys} for i in range(3)]


# case -> (fixture, merge_method, per-model parameters, extra config, merge kwargs)
CASES = {
    "linear": ("ckpts", "linear", _wd(("weight",)), {}, {}),
    "task_arithmetic": ("ckpts", "task_arithmetic", _wd(("weight",)),
                        {"parameters": {"lambda": 0.8}}, {}),
    "magnitude_prune": ("ckpts", "magnitude_prune", _wd(("density",)), {}, {}),
    "ties": ("ckpts", "ties", _wd(), {}, {}),
    "dare_linear": ("ckpts", "dare_linear", _wd(), {"parameters": {"rescale": False}}, {}),
    "dare_ties": ("ckpts", "dare_ties", _wd(), {}, {}),
    "breadcrumbs": ("ckpts", "breadcrumbs", _wd(), {"parameters": {"gamma": 0.05}}, {}),
    "breadcrumbs_ties": ("ckpts", "breadcrumbs_ties", _wd(), {}, {}),
    "consensus_ta": ("ckpts", "consensus_ta", _wd(("density",)),
                     {"parameters": {"consensus_k": 2}}, {}),
    "consensus_ties": ("ckpts", "consensus_ties", _wd(), {}, {}),
    "ffg": ("ckpts", "ffg", _wd(), {"moments": True}, {}),
    "ota": ("ckpts", "ota", _wd(("weight",)), {"moments": True}, {}),
    "ota_ffg": ("ckpts", "ota_ffg", _wd(), {"moments": True}, {}),
    # a selection and DARE statistics over tensors split into chunks
    "ties_chunked": ("ckpts", "ties", _wd(), {}, {"max_chunk_elems": 777}),
    "breadcrumbs_ties_l1_chunked": ("ckpts", "breadcrumbs_ties", _wd(),
                                    {"parameters": {"rescale": "l1"}},
                                    {"max_chunk_elems": 1000}),
    "dare_ties_chunked_bf16": ("ckpts", "dare_ties", _wd(), {"dtype": "bfloat16"},
                               {"max_chunk_elems": 777}),
    "ties_l1_fp16": ("ckpts", "ties", _wd(), {"parameters": {"rescale": "l1"},
                                              "out_dtype": "float16"}, {}),
    "ties_scope_model": ("ckpts", "ties", _wd(densities=(0.5, 0.4, 0.7)),
                         {"scope": "model"}, {}),
    "task_arithmetic_lines_shards": ("ckpts", "task_arithmetic", _wd(("weight",)),
                                     {"lines": {"alpha": 0.5, "beta": 1.0}},
                                     {"shard_size": "20KB"}),
    "ties_lines_auto": ("ckpts", "ties", _wd(), {"lines": {"alpha": "auto", "beta": 1.0}},
                        {}),
    "ties_window_miss": ("miss_ckpts", "ties", _wd(), {}, {}),
    "breadcrumbs_l1_window_miss": ("miss_ckpts", "breadcrumbs", _wd(),
                                   {"parameters": {"rescale": "l1"}}, {}),
}
PATHS = ("cli", "torch", "cpu")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    return make_synthetic_checkpoints(root, n_models=3, layers=2, hidden=32, inter=48,
                                      vocab=64, shards=2, moments=True)


def _mix64(x: int) -> int:
    """csrc/cpu/select.cpp's mix64 (the jitter of the sampled runs)."""
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def sampled_positions(n: int) -> torch.Tensor:
    """The element indices topk_window samples in a tensor of n > 65536 elements."""
    runs = min(max(n // (64 * 64), 128), 65536 // 64)
    stride = n // runs
    starts = [r * stride + _mix64(r) % (stride - 64 + 1) for r in range(runs)]
    return torch.tensor([s + j for s in starts for j in range(64)])


@pytest.fixture(scope="module")
def miss_ckpts(tmp_path_factory):
    """Two tensors; in MISS every model equals the base at the sampled positions, so the
    sample sees only zero task vectors and the window (lo = hi = 0) misses every k."""
    root = tmp_path_factory.mktemp("golden_miss")
    g = torch.Generator().manual_seed(7)
    base = {MISS: (0.02 * torch.randn(256, 512, generator=g)).bfloat16(),
            "model.norm.weight": torch.ones(32).bfloat16()}
    paths = {"base": save_checkpoint(root / "base", base, 1), "models": []}
    hit = sampled_positions(256 * 512)
    for i in range(3):
        t = {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).bfloat16()
             for k, v in base.items()}
        flat = t[MISS].reshape(-1)
        flat[hit] = base[MISS].reshape(-1)[hit]
        paths["models"].append(save_checkpoint(root / f"model_{i}", t, 1))
    return paths


def test_the_miss_fixture_makes_the_window_miss(miss_ckpts):
    """Guards the window-miss cases: the one-pass kernel reports a miss on MISS."""
    b = load_dir(miss_ckpts["base"])[MISS]
    m = load_dir(miss_ckpts["models"][0])[MISS]
    import fastmerge.backends.ops  # noqa: F401  (registers torch.ops.fastmerge)
    req = torch.tensor([[0, m.numel() // 3]], dtype=torch.int64)
    bits = torch.ops.fastmerge.topk_window(b, [m], req, False)[0]
    assert int(bits[0]) < 0, "the sampled window did not miss; the miss cases test nothing"


def tensor_hashes(out_dir: Path) -> dict:
    """{tensor: "DTYPE [shape] sha256"} of every tensor in the output's shards."""
    got = {}
    for f in sorted(Path(out_dir).glob("*.safetensors")):
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        for name, h in header.items():
            if name == "__metadata__":
                continue
            s, e = h["data_offsets"]
            digest = hashlib.sha256(raw[8 + n + s:8 + n + e]).hexdigest()
            got[name] = f"{h['dtype']} {h['shape']} {digest}"
    return dict(sorted(got.items()))


def _regen(case: str) -> bool:
    words = [w.strip() for w in os.environ.get(REGEN_ENV, "").split(",") if w.strip()]
    return any(w in ("1", "all") or w in case for w in words)


def _config(p, method, params, extra):
    extra = dict(extra)
    moments = extra.pop("moments", False)
    return {"merge_method": method, "base_model": str(p["base"]),
            "models": _models(p, params, moments), **extra}


def _merge(path: str, cfg: dict, out: Path, kw: dict) -> Path:
    if path == "cli":   # what `fastmerge merge` runs (without torch where it can)
        return native.merge(cfg, out, quiet=True, **kw).output_dir
    return fastmerge.merge_checkpoints(cfg, out, backend=path, **kw).output_dir


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_the_golden_hashes(case, request, tmp_path):
    fixture, method, params, extra, kw = CASES[case]
    p = request.getfixturevalue(fixture)
    cfg = _config(p, method, params, extra)
    got = {path: tensor_hashes(_merge(path, cfg, tmp_path / path, kw)) for path in PATHS}
    f = GOLDEN / f"{case}.json"
    if _regen(case) or not f.exists():
        GOLDEN.mkdir(exist_ok=True)
        f.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        if not _regen(case):
            pytest.fail(f"{f} did not exist: written now; review and commit it")
        return
    want = json.loads(f.read_text())
    for path in PATHS:
        diff = [k for k in sorted(set(want[path]) | set(got[path]))
                if want[path].get(k) != got[path].get(k)]
        assert not diff, f"{case}, path {path}: {len(diff)} tensor(s) differ, e.g. {diff[0]}"
