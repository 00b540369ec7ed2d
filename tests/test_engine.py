"""End-to-end checkpoint merges (fastmerge.merge_checkpoints) against per-tensor merges."""
from __future__ import annotations

import json

import pytest
import torch
from engine_util import (
    assert_same,
    check_against_reference,
    expected_merge,
    index_of,
    load_dir,
    write_yaml,
)
from safetensors import safe_open

import fastmerge
from fastmerge import reference
from fastmerge.cli.demo import make_synthetic_checkpoints
from fastmerge.methods.lines import block_index, count_blocks, lines_factor


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return make_synthetic_checkpoints(root, n_models=3, layers=3, hidden=64, inter=96,
                                      vocab=128, shards=3, moments=True,
                                      only=("q_proj", "up_proj", "input_layernorm"))


def _cfg(ckpts, method, model_params=None, params=None, **extra):
    models = []
    for i, m in enumerate(ckpts["models"]):
        e = {"model": str(m)}
        if model_params is not None:
            e["parameters"] = model_params[i]
        if extra.get("moments"):
            e["preconditioner_path"] = str(ckpts["moments"][i])
        models.append(e)
    extra.pop("moments", None)
    cfg = {"merge_method": method, "base_model": str(ckpts["base"]), "models": models}
    if params:
        cfg["parameters"] = params
    cfg.update(extra)
    return cfg


W = [0.5, 0.3, 0.2]
D = [0.5, 0.4, 0.3]
# method -> (per-model params, global params, merge_tensors kwargs the config means)
CASES = {
    "linear": ([{"weight": w} for w in W], None, dict(weights=W, normalize=True)),
    "task_arithmetic": ([{"weight": w} for w in W], {"lambda": 0.8},
                        dict(weights=W, lambda_=0.8, normalize=False)),
    "ties": ([{"weight": w, "density": d} for w, d in zip(W, D)], None,
             dict(weights=W, density=D, normalize=True, rescale=None)),
    "dare_ties": ([{"weight": w, "density": d} for w, d in zip(W, D)], None,
                  dict(weights=W, density=D, normalize=False, rescale="l1")),
    "dare_linear": ([{"weight": w, "density": d} for w, d in zip(W, D)], {"rescale": False},
                    dict(weights=W, density=D, normalize=False, rescale=None)),
    "breadcrumbs": ([{"weight": w, "density": d, "gamma": 0.05} for w, d in zip(W, D)], None,
                    dict(weights=W, density=D, gamma=0.05, normalize=False, rescale=None)),
    "breadcrumbs_ties": ([{"weight": w, "density": d} for w, d in zip(W, D)],
                         {"normalize": True},
                         dict(weights=W, density=D, gamma=0.01, normalize=True, rescale=None)),
    "magnitude_prune": ([{"density": d} for d in D], None, dict(density=D)),
    "consensus_ta": ([{"density": d} for d in D], {"consensus_k": 2}, dict(density=D)),
    "consensus_ties": ([{"density": d, "weight": w} for w, d in zip(W, D)], None,
                       dict(density=D, weights=W)),
}


def _available(name):
    from fastmerge.backends import availability
    ok, why = availability(name)
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {why}")
    return name


TORCH_SUBSET = ("linear", "ties", "dare_ties", "breadcrumbs", "consensus_ta")


@pytest.mark.parametrize("method,backend_name", [(m, "cpu") for m in sorted(CASES)] +
                         [(m, "torch") for m in TORCH_SUBSET])
def test_every_method_matches_per_tensor_merges(ckpts, tmp_path, method, backend_name):
    mp, gp, kw = CASES[method]
    cfg = write_yaml(tmp_path / "c.yml", _cfg(ckpts, method, mp, gp))
    res = fastmerge.merge_checkpoints(str(cfg), tmp_path / "out",
                                      backend=_available(backend_name),
                                      shard_size="60KB", seed=7)
    assert res.backend == backend_name
    got = load_dir(res.output_dir)
    check_against_reference(got, ckpts, method, lambda n: {}, seed=7, **kw)
    idx = index_of(res.output_dir)
    assert res.shards > 1 and len(set(idx["weight_map"].values())) == res.shards
    assert set(idx["weight_map"]) == set(got)
    assert (res.output_dir / "config.json").exists()
    assert (res.output_dir / "tokenizer_config.json").exists()
    assert method in (res.output_dir / "README.md").read_text()


@pytest.mark.parametrize("method", ["ffg", "ota", "ota_ffg"])
def test_curvature_methods_stream_second_moments(ckpts, tmp_path, method):
    cfg = write_yaml(tmp_path / "c.yml", _cfg(ckpts, method, [{"density": 0.3}] * 3
                                              if method != "ota" else None,
                                              {"ota_normalize": "global"} if method != "ffg"
                                              else None, moments=True))
    res = fastmerge.merge_checkpoints(str(cfg), tmp_path / "out", backend="torch",
                                      memory_budget="256MiB")
    got = load_dir(res.output_dir)
    from safetensors.torch import load_file
    vs = [load_file(str(f)) for f in ckpts["moments"]]
    kw = {} if method == "ota" else {"density": 0.3}
    if method != "ffg":
        kw["ota_normalize"] = "global"
    check_against_reference(got, ckpts, method, lambda n: {
        "second_moments": [v[n + ".exp_avg_sq"] for v in vs]}, **kw)


def test_gradient_and_filter_values_follow_mergekit(ckpts, tmp_path):
    """density gradient over depth, weight conditions by substring, first match wins."""
    mp = [{"density": [1.0, 0.2], "weight": 1.0},
          {"density": 0.5, "weight": [0.0, 0.3, 1.0]},
          {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]}]
    cfg = write_yaml(tmp_path / "c.yml", _cfg(ckpts, "ties", mp, {"normalize": True,
                                                                "int8_mask": True}))
    res = fastmerge.merge_checkpoints(str(cfg), tmp_path / "out", backend="torch")
    got = load_dir(res.output_dir)
    names = list(got)
    nb = count_blocks(names)

    def params(name):
        i = block_index(name)
        t = 0.0 if i is None else i / (nb - 1)
        w1 = 0.3 * t / 0.5 if t <= 0.5 else 0.3 + 0.7 * (t - 0.5) / 0.5
        return dict(density=[1.0 + (0.2 - 1.0) * t, 0.5, 0.33],
                    weights=[1.0, w1, 0.5 if "mlp" in name else 0.1])
    check_against_reference(got, ckpts, "ties", params, normalize=True)


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
def test_chunked_merge_equals_whole_tensor_merge(ckpts, tmp_path, backend_name):
    """A budget far below the tensor sizes splits tensors into row chunks; thresholds are
    aggregated over chunks (exact), DARE counters use global offsets."""
    _available(backend_name)
    for method, kw in (("ties", dict(density=0.3)), ("dare_ties", dict(density=0.5)),
                       ):
        cfg = write_yaml(tmp_path / f"{method}.yml",
                         _cfg(ckpts, method, None, {**kw, "normalize": True, "rescale": False}))
        whole = fastmerge.merge_checkpoints(str(cfg), tmp_path / f"{method}_whole",
                                            backend=backend_name, seed=3)
        chunked = fastmerge.merge_checkpoints(str(cfg), tmp_path / f"{method}_chunk",
                                              backend=backend_name, seed=3,
                                              max_chunk_elems=3000)
        assert chunked.chunk_elems == 3000
        assert_same(load_dir(chunked.output_dir), load_dir(whole.output_dir))


def test_scope_model_uses_one_threshold_over_the_whole_model(ckpts, tmp_path):
    cfg = write_yaml(tmp_path / "c.yml", _cfg(ckpts, "ties", [{"density": d} for d in D],
                                              None, scope="model"))
    res = fastmerge.merge_checkpoints(str(cfg), tmp_path / "out", backend="torch")
    base = load_dir(ckpts["base"])
    models = [load_dir(m) for m in ckpts["models"]]
    thr = []
    for i, m in enumerate(models):
        t = torch.cat([(m[k].float() - base[k].float()).abs().reshape(-1) for k in base])
        k = int(D[i] * t.numel())
        thr.append((reference.magnitude_threshold(t, k), float("inf")))
    assert [tuple(x) for x in res.resolved["model_thresholds"]] == thr
    want = expected_merge(ckpts, "ties", lambda n: {}, density=D, thresholds=thr,
                          normalize=True)
    assert_same(load_dir(res.output_dir), want)


def test_lines_scales_by_depth_and_auto_alpha(ckpts, tmp_path):
    cfg = _cfg(ckpts, "task_arithmetic", None, None, lines={"alpha": 0.5, "beta": 0.4})
    res = fastmerge.merge_checkpoints(write_yaml(tmp_path / "a.yml", cfg), tmp_path / "a",
                                      backend="torch")
    names = list(load_dir(ckpts["base"]))
    nb = count_blocks(names)
    check_against_reference(load_dir(res.output_dir), ckpts, "task_arithmetic", lambda n: {
        "lines_factor": lines_factor(block_index(n), nb, 0.5, 0.4)})
    # alpha: auto = ||sum t_i||_1 / (N ||merged||_1); for task arithmetic that is 1/N
    cfg["lines"] = {"alpha": "auto", "beta": 0.0}
    res = fastmerge.merge_checkpoints(write_yaml(tmp_path / "b.yml", cfg), tmp_path / "b",
                                      backend="torch")
    assert res.resolved["lines"]["alpha"] == pytest.approx(1 / 3, rel=1e-6)


def test_output_metadata_records_config_and_resolved_parameters(ckpts, tmp_path):
    cfg = write_yaml(tmp_path / "c.yml", _cfg(ckpts, "dare_ties", [{"density": 0.5}] * 3))
    res = fastmerge.merge_checkpoints(str(cfg), tmp_path / "out", backend="torch")
    shard = sorted(res.output_dir.glob("model-*.safetensors"))[0]
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    assert "dare_ties" in meta["merge_config"]
    resolved = json.loads(meta["fastmerge_resolved"])
    p = resolved["parameters"][0]
    assert p["rescale"] == "l1" and p["normalize"] is False and p["densities"] == [0.5] * 3
    assert resolved["defaults"] == "mergekit"


def test_hub_reference_resolves_through_the_local_cache(ckpts, tmp_path, monkeypatch):
    """org/name@revision via huggingface_hub's cache layout, offline."""
    import shutil
    cache = tmp_path / "hub"
    commit = "a" * 40
    repo = cache / "models--acme--tiny-base"
    shutil.copytree(ckpts["base"], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    cfg = _cfg(ckpts, "task_arithmetic", None, None)
    cfg["base_model"] = "acme/tiny-base@main"
    res = fastmerge.merge_checkpoints(cfg, tmp_path / "out", backend="torch")
    check_against_reference(load_dir(res.output_dir), ckpts, "task_arithmetic", lambda n: {})
    cfg["base_model"] = "acme/not-cached"
    with pytest.raises(ValueError, match="acme/not-cached.*offline"):
        fastmerge.merge_checkpoints(cfg, tmp_path / "out2", backend="torch")
    assert not (tmp_path / "out2").exists()


def test_mapped_ranges_equal_preadv_reads(tmp_path, monkeypatch):
    """SafetensorsFile.map (the CPU engine's zero-copy chunks) returns exactly what preadv
    reads, for ranges at unaligned offsets, empty ranges and whole tensors, and its tensors
    stay valid (copy-on-write, no file writes) after the file object is closed."""
    from safetensors.torch import save_file

    from fastmerge.checkpoint.safetensors_file import SafetensorsFile
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(1001, generator=g).to(torch.bfloat16),
               "b": torch.randn(37, 129, generator=g),
               "c": torch.randn(5000, generator=g).to(torch.float16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    before = (tmp_path / "x.safetensors").read_bytes()
    f = SafetensorsFile(tmp_path / "x.safetensors")
    kept = []
    for name, t in tensors.items():
        n = t.numel()
        for start, stop in ((0, n), (1, n), (3, 7), (n - 1, n), (5, 5), (n // 3, 2 * n // 3)):
            got = f.map(name, start, stop)
            assert got.dtype == t.dtype
            assert torch.equal(got, f.read(name, start, stop))
            assert torch.equal(got, t.reshape(-1)[start:stop])
            kept.append((got, t.reshape(-1)[start:stop]))
    kept[0][0].add_(1)  # private mapping: the file is not written
    f.close()
    for got, want in kept[1:]:
        assert torch.equal(got, want)
    assert (tmp_path / "x.safetensors").read_bytes() == before
    # a file system that cannot map files: the same bytes through preadv
    from fastmerge.checkpoint import safetensors_file as checkpoint_io

    def no_mmap(*a, **k):
        raise OSError(19, "No such device")
    monkeypatch.setattr(checkpoint_io.mmap, "mmap", no_mmap)
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert torch.equal(f.map("b", 3, 400), tensors["b"].reshape(-1)[3:400])
    f.close()
