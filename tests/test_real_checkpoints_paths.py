"""Issue 20's inputs (.bin files, ``base+adapter`` LoRA references, ``tokenizer_source:
union``) in every path of the one pipeline: the API (``merge_checkpoints``), ``fastmerge
merge`` (and ``--dry-run``), torchrun (2 processes, gloo, giant tensors split by rows: byte-
identical to the single-process merge) and the mergekit integration (mergekit loads the
inputs itself; patched, it gives stock mergekit's result)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from ckpt_util import state_dict_of, write_adapter, write_bin
from engine_util import write_yaml

import fastmerge
from fastmerge.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from test_distributed import _torchrun  # noqa: E402
from test_union_tokenizer import WORDS, _llama  # noqa: E402

SHARD = "12KB"
SPLIT = "2000"       # bytes: embeddings, lm_head, q/o_proj and the MLP split by rows
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def _as_bin(src, dst, shards):
    """``src`` (a transformers checkpoint) as .bin files, with its config and tokenizer."""
    write_bin(dst, state_dict_of(src), shards=shards,
              config=json.loads((src / "config.json").read_text()))
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """b: a tiny Llama (its tokenizer: WORDS); s1, s2: fine-tunes with its vocabulary; f1, f2:
    fine-tunes that add tokens (f2 reorders them); .bin copies; a LoRA adapter over b."""
    d = tmp_path_factory.mktemp("real_paths")
    b = _llama(d / "b", WORDS)
    _llama(d / "s1", WORDS, base=b, seed=3)
    _llama(d / "s2", WORDS, base=b, seed=4)
    _llama(d / "f1", WORDS + ["x1", "x2"], ["<tool>"], base=b, seed=1)
    _llama(d / "f2", list(reversed(WORDS)), ["<im>", "<tool>"], base=b, seed=2)
    _as_bin(d / "b", d / "b_bin", shards=2)           # sharded, with its index
    _as_bin(d / "s1", d / "s1_bin", shards=1)         # pytorch_model.bin
    _as_bin(d / "f1", d / "f1_bin", shards=1)
    write_adapter(d / "ad", state_dict_of(d / "b"), TARGETS, r=4, alpha=8, seed=5)
    return d


def _entry(d, m, w):
    return {"model": m if "+" in m else str(d / m), "parameters": {"weight": w, "density": 0.6}}


def _raw(d, method, base, entries, **top):
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [_entry(d, m, w) for m, w in entries], **top}
    if base is not None:
        cfg["base_model"] = str(d / base)
    return cfg


def _cases(d) -> dict:
    lora = f"{d / 'b'}+{d / 'ad'}"
    return {
        "bin": _raw(d, "ties", "b_bin", [("s1_bin", 0.7), ("s2", 0.5)]),
        "lora": _raw(d, "dare_ties", "b", [(lora, 0.7), ("s1", 0.5)]),
        "lora_bin_base": _raw(d, "task_arithmetic", "b_bin",
                              [(f"{d / 'b_bin'}+{d / 'ad'}", 0.6), ("s2", 0.4)]),
        "union": _raw(d, "ties", "b", [("f1", 0.7), ("f2", 0.5)], tokenizer_source="union"),
        "union_all": _raw(d, "dare_ties", "b_bin", [("f1_bin", 0.6), ("f2", 0.5), (lora, 0.4)],
                          tokenizer_source="union"),
    }


def _files(d) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _assert_identical(got, want, what):
    g, w = _files(got), _files(want)
    assert sorted(g) == sorted(w), (what, sorted(g), sorted(w))
    for name in w:
        if name != "README.md":     # the model card names the output directory
            assert g[name] == w[name], f"{what}: {name} differs from the single-process merge"


# ----------------------------------------------------------------------------- the API, the CLI

@pytest.mark.parametrize("case", ["bin", "lora", "lora_bin_base", "union", "union_all"])
def test_api_cli_and_dry_run(models, tmp_path, capsys, case):
    """merge_checkpoints and ``fastmerge merge`` give the same bytes; --dry-run plans the
    merge without writing anything."""
    d = models
    cfg = write_yaml(tmp_path / "c.yml", _cases(d)[case])
    api = fastmerge.merge_checkpoints(str(cfg), tmp_path / "api", seed=7, shard_size=SHARD)
    assert api.shards > 1
    assert main(["merge", str(cfg), str(tmp_path / "cli"), "--quiet", "--seed", "7",
                 "--shard-size", SHARD]) == 0
    _assert_identical(tmp_path / "cli", tmp_path / "api", f"{case}: CLI vs API")
    capsys.readouterr()
    assert main(["merge", str(cfg), str(tmp_path / "dry"), "--dry-run"]) == 0
    assert not (tmp_path / "dry").exists()
    plan = capsys.readouterr().out
    out = tmp_path / "api"
    conf = json.loads((out / "config.json").read_text())
    assert f"model.embed_tokens.weight  [{conf['vocab_size']}, 32]" in plan, plan
    sd = state_dict_of(out)
    assert conf["vocab_size"] == sd["model.embed_tokens.weight"].shape[0]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == conf["vocab_size"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    model(torch.tensor([tok("w1 w2 w3")["input_ids"]]))


def test_api_lora_input_is_the_premerged_adapter(models, tmp_path):
    """``b+ad`` in a merge is the merge of ``b`` with W + s B A folded in (s = alpha / r)."""
    d = models
    base = state_dict_of(d / "b")
    ad = state_dict_of(d / "ad")
    folded = dict(base)
    for k, w in base.items():
        pre = f"base_model.model.{k[:-len('.weight')]}"
        if f"{pre}.lora_A.weight" in ad:
            folded[k] = w + 2.0 * ad[f"{pre}.lora_B.weight"] @ ad[f"{pre}.lora_A.weight"]
    shutil.copytree(d / "b", tmp_path / "folded")
    from safetensors.torch import save_file
    save_file(folded, str(tmp_path / "folded" / "model.safetensors"))
    raw = _cases(d)["lora_bin_base"]
    got = fastmerge.merge_checkpoints(raw, tmp_path / "got", seed=7)
    raw["models"][0]["model"] = str(tmp_path / "folded")
    want = fastmerge.merge_checkpoints(raw, tmp_path / "want", seed=7)
    g, w = state_dict_of(got.output_dir), state_dict_of(want.output_dir)
    assert set(g) == set(w)
    for k in w:
        torch.testing.assert_close(g[k], w[k], rtol=1e-6, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- torchrun

WORKER = """
import json, sys
import torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")
import fastmerge
for cfg, out in json.loads(open(sys.argv[1]).read()):
    fastmerge.merge_checkpoints(cfg, out, shard_size=%r, seed=7, quiet=True)
dist.barrier()
dist.destroy_process_group()
""" % SHARD


def test_torchrun_is_byte_identical_to_one_process(models, tmp_path, monkeypatch):
    """Every case in one 2-process launch (the API), and ``fastmerge merge`` under torchrun
    on the case with all three input kinds, against the single-process merges."""
    monkeypatch.setenv("FASTMERGE_SPLIT_BYTES", SPLIT)
    d = models
    jobs = []
    for name, raw in _cases(d).items():
        cfg = write_yaml(tmp_path / f"{name}.yml", raw)
        fastmerge.merge_checkpoints(str(cfg), tmp_path / f"{name}_1", seed=7, shard_size=SHARD)
        jobs.append((str(cfg), str(tmp_path / f"{name}_2")))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "worker.py").write_text(WORKER)
    r = _torchrun([str(tmp_path / "worker.py"), str(tmp_path / "jobs.json")], timeout=300,
                  FASTMERGE_SPLIT_BYTES=SPLIT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in _cases(d):
        _assert_identical(tmp_path / f"{name}_2", tmp_path / f"{name}_1", f"torchrun {name}")
    out = tmp_path / "cli_2"
    r = _torchrun(["-m", "fastmerge", "merge", str(tmp_path / "union_all.yml"), str(out),
                   "--quiet", "--seed", "7", "--shard-size", SHARD], timeout=300,
                  FASTMERGE_SPLIT_BYTES=SPLIT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _assert_identical(out, tmp_path / "union_all_1", "torchrun fastmerge merge union_all")


# ----------------------------------------------------------------------------- mergekit

def _peft_adapter(d, path):
    """A real peft adapter over ``b`` (mergekit merges it with peft itself)."""
    peft = pytest.importorskip("peft")
    if (path / "adapter_config.json").exists():
        return path
    model = transformers.AutoModelForCausalLM.from_pretrained(d / "b")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                    target_modules=list(TARGETS)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(path)
    return path


def _mergekit_cases(d) -> dict:
    lora = f"{d / 'b'}+{_peft_adapter(d, d / 'peft_ad')}"
    return {
        "lora": _raw(d, "task_arithmetic", "b", [(lora, 0.7), ("s1", 0.5)]),
        "bin": _raw(d, "ties", "b_bin", [("s1_bin", 0.7), ("s2", 0.5)]),
        "union": _raw(d, "task_arithmetic", "b", [("f1_bin", 0.7), ("f2", 0.5), (lora, 0.3)],
                      tokenizer_source="union"),
        "linear_lora": _raw(d, "linear", None, [(lora, 0.6), ("s1_bin", 0.4)]),
    }


def _run_mergekit(raw, out, patched, cache):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    import fastmerge.integrations.mergekit as fm_mk
    opts = MergeOptions(copy_tokenizer=True, lazy_unpickle=False, quiet=True, random_seed=7,
                        lora_merge_cache=str(cache), write_model_card=False)
    fm_mk.reset_stats()
    conf = MergeConfiguration.model_validate(raw)
    if patched:
        with fm_mk.patched(backend="auto"):
            run_merge(conf, str(out), options=opts)
    else:
        run_merge(conf, str(out), options=opts)
    return state_dict_of(out), fm_mk.stats()


def _assert_same_by_token(ours_dir, ours, stock_dir, stock):
    """Equal tensors, the token rows compared token by token: mergekit orders a model's new
    ordinary tokens by hash-map order, which may differ between two runs."""
    vo = transformers.AutoTokenizer.from_pretrained(ours_dir).get_vocab()
    vm = transformers.AutoTokenizer.from_pretrained(stock_dir).get_vocab()
    assert set(vo) == set(vm)
    perm = torch.tensor([vm[t] for t, _ in sorted(vo.items(), key=lambda kv: kv[1])])
    assert set(ours) == set(stock)
    for k in stock:
        want = stock[k]
        assert ours[k].dtype == want.dtype and ours[k].shape == want.shape, k
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            want = torch.cat([want[perm], want[len(perm):]])
        torch.testing.assert_close(ours[k], want, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("case", ["lora", "bin", "union", "linear_lora"])
def test_mergekit_patched_gives_mergekits_result(models, tmp_path, case):
    pytest.importorskip("mergekit")
    d = models
    raw = _mergekit_cases(d)[case]
    stock, _ = _run_mergekit(raw, tmp_path / "stock", False, tmp_path / "cache")
    ours, st = _run_mergekit(raw, tmp_path / "fm", True, tmp_path / "cache")
    method = raw["merge_method"]
    assert st.get(f"fastmerge:{method}", 0) > 0, st
    assert not any(k.startswith("fallback") for k in st), st
    _assert_same_by_token(tmp_path / "fm", ours, tmp_path / "stock", stock)
    if case == "union":
        vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "fm").get_vocab()
        assert {"x1", "x2", "<tool>", "<im>"} <= set(vocab)


def test_fastmerge_mergekit_yaml_cli(models, tmp_path):
    """``fastmerge mergekit-yaml`` with a LoRA input, a .bin input and a union tokenizer."""
    pytest.importorskip("mergekit")
    d = models
    cfg = write_yaml(tmp_path / "c.yml", _mergekit_cases(d)["union"])
    args = ["--lora-merge-cache", str(tmp_path / "cache"), "--no-lazy-unpickle", "--quiet",
            "--random-seed", "7"]
    assert main(["mergekit-yaml", str(cfg), str(tmp_path / "out"), *args]) == 0
    rec = json.loads((tmp_path / "out" / "fastmerge_integration.json").read_text())
    assert rec["patched"] and rec["tensors"].get("fastmerge:task_arithmetic", 0) > 0, rec
    stock, _ = _run_mergekit(_mergekit_cases(d)["union"], tmp_path / "stock", False,
                             tmp_path / "cache")
    _assert_same_by_token(tmp_path / "out", state_dict_of(tmp_path / "out"),
                          tmp_path / "stock", stock)
