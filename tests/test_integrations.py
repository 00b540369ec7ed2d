"""fastmerge.integrations: mergekit's pipeline with and without the patch on tiny synthetic
checkpoints made here (offline), peft's merge functions vs ours, add_weighted_adapter patched.

Outputs must be equal except at the documented differences (docs/integrations.md): threshold
ties (we keep all), election sums on their decision boundary, bf16 arithmetic (mergekit's
deltas in bf16: widened tolerance, explicit), DARE (different random masks: statistics only).
"""
import json
import math
import os

import pytest
import torch
from test_peers import close, l1_tie_slack, tie_positions, ulp_of, value_tol

from fastmerge.testing import ambiguous_elements, reference_with_aux

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIGMAS = 5.0


# ----------------------------------------------------------------------------- checkpoints

def _save_tiny_llama(path, state_dict, cfg):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(state_dict)
    model.save_pretrained(path)  # config.json + model.safetensors


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    pytest.importorskip("mergekit")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("ckpts")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).state_dict()
    base = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(1)
    paths = {}
    for dt_name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg.dtype = dt
        for i, name in enumerate(("base", "ft0", "ft1")):
            sd = {k: (v if name == "base" else v + 0.01 * torch.randn(v.shape, generator=g)
                      ).to(dt) for k, v in base.items()}
            p = root / f"{name}_{dt_name}"
            _save_tiny_llama(p, sd, cfg)
            paths[(name, dt_name)] = str(p)
    return paths


def _load(path):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _config(ckpts, method, dt="fp32", params=None, shared=None):
    params = params or [{}, {}]
    cfg = {"merge_method": method, "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dt],
           "models": [{"model": ckpts[(n, dt)], "parameters": p}
                      for n, p in zip(("ft0", "ft1"), params)]}
    if method != "linear":
        cfg["base_model"] = ckpts[("base", dt)]
    else:
        cfg["models"].insert(0, {"model": ckpts[("base", dt)], "parameters": {"weight": 0.2}})
    if shared:
        cfg["parameters"] = shared
    return cfg


def _run_mergekit(cfg, out, patched, seed=42):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import fastmerge.integrations.mergekit as fm_mk
    conf = MergeConfiguration.model_validate(cfg)
    opts = MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed,
                        write_model_card=False)
    fm_mk.reset_stats()
    if patched:
        with fm_mk.patched(backend="auto"):  # the C++ backend where built, else torch
            run_merge(conf, str(out), options=opts)
    else:
        assert not fm_mk.is_installed()
        run_merge(conf, str(out), options=opts)
    return _load(out), fm_mk.stats()


# mergekit method -> (per-model params, shared params, fastmerge kwargs builder)
DETERMINISTIC = {
    "task_arithmetic": ([{"weight": 0.7}, {"weight": 0.5}], {"lambda": 0.9},
                        dict(lambda_=0.9, normalize=False)),
    "ties": ([{"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": 0.7}], None,
             dict(normalize=True)),
    "breadcrumbs": ([{"weight": 1.0, "density": 0.5, "gamma": 0.05},
                     {"weight": 0.5, "density": 0.3, "gamma": 0.01}], None, dict()),
    "breadcrumbs_ties": ([{"weight": 1.0, "density": 0.5, "gamma": 0.05},
                          {"weight": 0.8, "density": 0.4, "gamma": 0.1}], {"rescale": True},
                         dict(rescale="l1", normalize=False)),
    "linear": ([{"weight": 0.5}, {"weight": 0.3}], None, dict()),
}


def _fm_kwargs(method, params, extra):
    kw = dict(extra, weights=[p["weight"] for p in params])
    if "density" in params[0]:
        kw["density"] = [p["density"] for p in params]
    if "gamma" in params[0]:
        kw["gamma"] = [p["gamma"] for p in params]
    return kw


@pytest.mark.parametrize("method", sorted(DETERMINISTIC))
def test_mergekit_patched_equals_stock(ckpts, tmp_path, method):
    params, shared, extra = DETERMINISTIC[method]
    cfg = _config(ckpts, method, "fp32", params, shared)
    stock, _ = _run_mergekit(cfg, tmp_path / "stock", patched=False)
    ours, st = _run_mergekit(cfg, tmp_path / "fm", patched=True)
    assert st.get(f"fastmerge:{method}", 0) > 0, st
    assert not any(k.startswith("fallback") for k in st), st
    assert stock.keys() == ours.keys()
    base, fts = _load(ckpts[("base", "fp32")]), [_load(ckpts[(n, "fp32")]) for n in ("ft0", "ft1")]
    for name in stock:
        a, b = ours[name], stock[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if method == "linear":
            w = [0.2] + extra.get("weights", [p["weight"] for p in params])
            tol = value_tol(None, [base[name]] + [f[name] for f in fts], w, b.dtype) / sum(w) \
                + ulp_of(b, b.dtype)
            close(a, b, tol, torch.zeros(a.shape, dtype=torch.bool), f"{method} {name}")
            continue
        kw = _fm_kwargs(method, params, extra)
        models = [f[name] for f in fts]
        _, _, aux = reference_with_aux(base[name], models, method, **kw)
        skip = ambiguous_elements(aux)
        if "density" in kw:
            skip |= tie_positions(base[name], models, method, **kw)
        tol = value_tol(base[name], models, kw["weights"], b.dtype,
                        max(aux["rescale"]) / min(1.0, sum(kw["weights"]))) + ulp_of(b, b.dtype)
        if kw.get("rescale") == "l1":
            slack = l1_tie_slack(base[name], models, method, **kw)
            tol = tol + slack
            if "elect_sum" in aux:
                skip |= aux["elect_sum"].abs() <= slack
        close(a, b, tol, skip, f"{method} {name}")


def test_mergekit_bf16_within_widened_tolerance(ckpts, tmp_path):
    """bf16 checkpoints: mergekit computes deltas and sums in bf16, we in float32 (documented);
    the outputs agree within bf16 arithmetic on the terms at >= 99% of the elements."""
    params = [{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    cfg = _config(ckpts, "ties", "bf16", params)
    stock, _ = _run_mergekit(cfg, tmp_path / "stock", patched=False)
    ours, _ = _run_mergekit(cfg, tmp_path / "fm", patched=True)
    base, fts = _load(ckpts[("base", "bf16")]), [_load(ckpts[(n, "bf16")]) for n in ("ft0", "ft1")]
    bad = total = 0
    for name in stock:
        a, b = ours[name], stock[name]
        assert a.dtype == b.dtype == torch.bfloat16
        models = [f[name] for f in fts]
        skip = tie_positions(base[name], models, "ties", density=0.5)
        tol = value_tol(base[name], models, [0.6, 0.5], torch.bfloat16, 1 / 0.5, rel=2.0 ** -6) \
            + 2 * ulp_of(b, torch.bfloat16)
        bad += int((((a.double() - b.double()).abs() > tol) & ~skip).sum())
        total += a.numel()
    assert bad <= 0.01 * total, f"{bad} of {total} bf16 elements beyond the widened tolerance"


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_mergekit_dare_statistics(ckpts, tmp_path, method):
    d = 0.3
    params = [{"weight": 0.6, "density": d}, {"weight": 0.5, "density": d}]
    cfg = _config(ckpts, method, "fp32", params)
    stock, _ = _run_mergekit(cfg, tmp_path / "stock", patched=False)
    ours, st = _run_mergekit(cfg, tmp_path / "fm", patched=True)
    assert st.get(f"fastmerge:{method}", 0) > 0, st
    base = _load(ckpts[("base", "fp32")])
    changed = {"stock": 0, "ours": 0}
    n = 0
    for name in stock:
        changed["stock"] += int((stock[name] != base[name]).sum())
        changed["ours"] += int((ours[name] != base[name]).sum())
        n += base[name].numel()
    f1, f2 = changed["stock"] / n, changed["ours"] / n
    expect = 1 - (1 - d) ** 2  # an element changes iff some model keeps it (and it survives)
    p = (f1 + f2) / 2
    assert abs(f1 - f2) <= SIGMAS * math.sqrt(2 * p * (1 - p) / n), (f1, f2)
    if method == "dare_linear":
        sd = math.sqrt(expect * (1 - expect) / n)
        assert abs(f2 - expect) <= SIGMAS * sd, (f2, expect)
    # reproducible: same seed -> same output; another seed -> another mask
    again, _ = _run_mergekit(cfg, tmp_path / "fm2", patched=True)
    other, _ = _run_mergekit(cfg, tmp_path / "fm3", patched=True, seed=7)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(again[name], ours[name])
    assert not torch.equal(other[name], ours[name])


def test_mergekit_della_routed(ckpts, tmp_path):
    """della runs fastmerge's della (its own draws); dense della equals mergekit's."""
    params = [{"weight": 0.6, "density": 1.0}, {"weight": 0.5, "density": 1.0}]
    cfg = _config(ckpts, "della", "fp32", params)
    stock, _ = _run_mergekit(cfg, tmp_path / "stock", patched=False, seed=3)
    ours, st = _run_mergekit(cfg, tmp_path / "fm", patched=True, seed=3)
    assert st and all(k.startswith("fastmerge:della") for k in st), st
    for name in stock:
        torch.testing.assert_close(ours[name], stock[name], rtol=2 ** -16, atol=1e-7)


def test_mergekit_cli_main(ckpts, tmp_path, monkeypatch):
    import yaml

    import fastmerge.integrations.mergekit as fm_mk
    params = [{"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": 0.7}]
    cfg_path = tmp_path / "ties.yml"
    cfg_path.write_text(yaml.safe_dump(_config(ckpts, "ties", "fp32", params)))
    args = ["--no-copy-tokenizer", "--quiet", "--random-seed", "1"]
    assert fm_mk.main([str(cfg_path), str(tmp_path / "on")] + args) == 0
    rec = json.loads((tmp_path / "on" / "fastmerge_integration.json").read_text())
    assert rec["patched"] and rec["tensors"].get("fastmerge:ties", 0) > 0, rec
    assert not fm_mk.is_installed()
    monkeypatch.setenv("FASTMERGE_MERGEKIT", "0")
    assert fm_mk.main([str(cfg_path), str(tmp_path / "off")] + args) == 0
    rec = json.loads((tmp_path / "off" / "fastmerge_integration.json").read_text())
    assert not rec["patched"] and rec["tensors"] == {}, rec
    on, off = _load(tmp_path / "on"), _load(tmp_path / "off")
    assert on.keys() == off.keys()
    assert fm_mk.main(["--help"]) == 0


def test_mergekit_version_check(monkeypatch):
    pytest.importorskip("mergekit")
    import fastmerge.integrations.mergekit as fm_mk
    monkeypatch.setattr(fm_mk, "mergekit_version", lambda: "0.0.9")
    monkeypatch.delenv(fm_mk.FORCE_ENV, raising=False)
    with pytest.raises(fm_mk.MergekitVersionError, match="supports mergekit 0.1.5"):
        fm_mk.install()
    assert not fm_mk.is_installed()
    monkeypatch.setenv(fm_mk.FORCE_ENV, "1")
    with fm_mk.patched():
        assert fm_mk.is_installed()
    assert not fm_mk.is_installed()
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    assert not getattr(GeneralizedTaskArithmeticMerge.merge_group, "__fastmerge_patch__", False)


def test_mergekit_parameter_mapping():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry

    import fastmerge.integrations.mergekit as fm_mk
    want = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare_ties": "dare_ties",
            "dare_linear": "dare_linear", "breadcrumbs": "breadcrumbs",
            "breadcrumbs_ties": "breadcrumbs_ties", "della": None, "della_linear": None}
    for mk_name, fm_name in want.items():
        assert fm_mk.fastmerge_method_for(registry.get(mk_name)) == fm_name, mk_name
    m = registry.get("dare_ties")
    params = {"weight": {1: 1.0, 2: 0.5}, "density": {1: 0.4, 2: 0.6}, "lambda": 1.0,
              "normalize": False, "rescale": True, "int8_mask": False}
    method, kw, _ = fm_mk.resolve_gta_parameters(m, [1.0, 0.5], params, [1, 2])
    assert method == "dare_ties" and kw["rescale"] == "l1" and kw["density"] == [0.4, 0.6]
    assert kw["normalize"] is False and kw["election"] == "sum"
    params["density"] = {1: 1.5, 2: 0.6}
    assert fm_mk.resolve_gta_parameters(m, [1.0, 0.5], params, [1, 2])[0] is None  # fallback
    # breadcrumbs on a tensor with fewer than 1/d elements: mergekit keeps nothing, so do we
    bc = registry.get("breadcrumbs")
    params.update(density={1: 0.01, 2: 0.5}, gamma={1: 0.01, 2: 0.01}, rescale=False)
    method, kw, _ = fm_mk.resolve_gta_parameters(bc, [1.0, 0.5], params, [1, 2], numel=64)
    assert method == "breadcrumbs" and kw["density"] == [0.0, 0.5] and kw["rescale"] is None
    from mergekit.merge_methods.base import TensorGroup
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(64, generator=g) for _ in range(3)]
    group = TensorGroup.from_tensors(ts, base_index=0, name="model.norm.weight")
    p = {"weight": [1.0, 0.5], "density": [0.01, 0.5], "gamma": [0.01, 0.01]}
    (want,) = bc([group], parameters=p)
    with fm_mk.patched(backend="torch"):
        (got,) = bc([group], parameters=p)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- peft

def _peft():
    pytest.importorskip("peft")
    import fastmerge.integrations.peft as fm_peft
    return fm_peft


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties"])
def test_peft_functions_match_peft(name, dt):
    fm_peft = _peft()
    orig = fm_peft.originals()
    g = torch.Generator().manual_seed(4)
    tvs = [(torch.randn(40, 24, generator=g) * 0.01).to(dt) for _ in range(3)]
    w = torch.tensor([0.5, 1.0, -0.3])
    args = (tvs, w) if name == "task_arithmetic" else (tvs, w, 0.4)
    want, got = orig[name](*args), getattr(fm_peft, name)(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    params = dict(weights=w.tolist())
    skip = torch.zeros(want.shape, dtype=torch.bool)
    if name != "task_arithmetic":
        params["density"] = 0.4
        if name == "ties":
            params.update(elect_on="unweighted", normalize="count")
        skip = tie_positions(None, tvs, name, **params)
        if name == "ties":
            s = torch.stack([t.float() for t in tvs])
            skip |= s.sum(0).abs() <= 2.0 ** -6 * s.abs().sum(0)  # bf16 election sums in peft
    close(got, want, value_tol(None, tvs, w.tolist(), want.dtype) + ulp_of(want, want.dtype),
          skip, name)


def test_peft_edge_semantics():
    fm_peft = _peft()
    orig = fm_peft.originals()
    tvs = [torch.randn(10) for _ in range(2)]
    w = torch.tensor([1.0, 1.0])
    # int(density * n) == 0 keeps nothing, as peft does (fastmerge alone would keep one)
    assert torch.equal(fm_peft.magnitude_prune(tvs, w, 0.05), orig["magnitude_prune"](tvs, w, 0.05))
    with pytest.warns(UserWarning):
        torch.testing.assert_close(fm_peft.ties(tvs, w, 1.0), orig["ties"](tvs, w, 1.0))
    with pytest.raises(ValueError, match="Density"):
        fm_peft.ties(tvs, w, -0.1)
    # float64 is not a fastmerge dtype: peft's own function runs
    t64 = [t.double() for t in tvs]
    before = fm_peft.calls()["ties"]
    torch.testing.assert_close(fm_peft.ties(t64, w.double(), 0.5),
                               orig["ties"](t64, w.double(), 0.5))
    assert fm_peft.calls()["ties"] == before
    # DARE: kept fraction and 1/density rescale
    t = torch.randn(20000) * 0.01
    out = fm_peft.dare_linear([t], torch.tensor([0.5]), 0.25)
    kept = out != 0
    sd = math.sqrt(20000 * 0.25 * 0.75)
    assert abs(int(kept.sum()) - 5000) <= SIGMAS * sd
    torch.testing.assert_close(out[kept], t[kept] * 0.5 / 0.25, rtol=2e-6, atol=0)
    torch.manual_seed(0)
    a = fm_peft.dare_ties(tvs, w, 0.5)
    torch.manual_seed(0)
    assert torch.equal(a, fm_peft.dare_ties(tvs, w, 0.5))  # torch.manual_seed reproduces


def _tiny_lora_model():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)
    pm = peft.get_peft_model(model, lcfg, adapter_name="a")
    torch.manual_seed(1)
    pm.add_adapter("b", lcfg)
    return pm


def _adapter_weights(pm, name):
    return {k: v.detach().clone() for k, v in pm.state_dict().items() if f".{name}." in k}


def test_add_weighted_adapter_patched():
    fm_peft = _peft()
    pm = _tiny_lora_model()
    kw = dict(adapters=["a", "b"], weights=[0.7, 0.4], density=0.5)
    pm.add_weighted_adapter(adapter_name="stock", combination_type="ties", **kw)
    before = fm_peft.calls()
    with fm_peft.patched(backend="torch"):
        import peft.tuners.lora.model as lora_model
        assert lora_model.ties is fm_peft.ties
        pm.add_weighted_adapter(adapter_name="fm", combination_type="ties", **kw)
        pm.add_weighted_adapter(adapter_name="fm_dare", combination_type="dare_linear", **kw)
        pm.add_weighted_adapter(adapter_name="fm_mp", combination_type="magnitude_prune", **kw)
    assert lora_model.ties is fm_peft.originals()["ties"]
    after = fm_peft.calls()
    n_layers = 2 * 2  # (q_proj, v_proj) x 2 layers, each merges lora_A and lora_B
    assert after["ties"] - before["ties"] == 2 * n_layers
    assert after["dare_linear"] - before["dare_linear"] == 2 * n_layers
    assert after["magnitude_prune"] - before["magnitude_prune"] == 2 * n_layers
    stock, ours = _adapter_weights(pm, "stock"), _adapter_weights(pm, "fm")
    assert len(stock) == len(ours) == 2 * n_layers
    for k, want in stock.items():
        got = ours[k.replace(".stock.", ".fm.")]
        assert got.dtype == want.dtype
        # rebuild the inputs peft merged to find threshold ties and close elections
        mod = pm.get_submodule(k.rsplit(".lora_", 1)[0])
        side = "lora_A" if ".lora_A." in k else "lora_B"
        tvs = [getattr(mod, side)[a].weight.detach() for a in ("a", "b")]
        ws = [math.sqrt(0.7 * mod.scaling["a"]), math.sqrt(0.4 * mod.scaling["b"])]
        params = dict(weights=ws, density=0.5, elect_on="unweighted", normalize="count")
        _, _, aux = reference_with_aux(None, tvs, "ties", **params)
        skip = tie_positions(None, tvs, "ties", **params) | ambiguous_elements(aux)
        close(got, want, value_tol(None, tvs, ws, want.dtype) + ulp_of(want, want.dtype), skip, k)
    dare = _adapter_weights(pm, "fm_dare")
    frac = sum(int((v != 0).sum()) for v in dare.values()) / sum(v.numel() for v in dare.values())
    assert abs(frac - (1 - 0.5 ** 2)) < 0.1, frac
