"""tokenizer_source over differing vocabularies (docs/semantics.md "Vocabularies"): tiny
Llamas with WordLevel tokenizers, fine-tunes that add tokens; the output tokenizer loads with
AutoTokenizer, config.json's vocab_size matches, and the rows match mergekit-yaml's."""
from __future__ import annotations

import json

import pytest
import torch
from ckpt_util import assert_rss_within, state_dict_of
from engine_util import write_yaml

from fastmerge.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
WORDS = [f"w{i}" for i in range(40)]


def _tokenizer(path, words, added=()):
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                               bos_token="<s>", eos_token="</s>")
    tok.add_tokens(list(added))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(path)
    return tok


def _llama(path, words, added=(), base=None, seed=0, hidden=32, tied=False):
    """A tiny Llama with its tokenizer; a fine-tune of ``base`` keeps the base's rows (plus
    noise) for the tokens they share, wherever its tokenizer puts them."""
    tok = _tokenizer(path, words, added)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden,
                                   intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=tied)
    m = transformers.LlamaForCausalLM(cfg)
    if base is not None:
        bsd, btok = base
        sd = m.state_dict()
        bv = btok.get_vocab()
        pairs = [(i, bv[t]) for t, i in tok.get_vocab().items() if t in bv]
        mine, theirs = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        for k, v in bsd.items():
            if k in (EMBED, HEAD):
                sd[k][mine] = v[theirs] + 0.01 * torch.randn(len(pairs), v.shape[1])
            else:
                sd[k] = v + 0.01 * torch.randn_like(v)
        m.load_state_dict(sd)
    m.save_pretrained(path)
    return m.state_dict(), tok


@pytest.fixture()
def vocab_models(tmp_path):
    b = _llama(tmp_path / "b", WORDS)
    _llama(tmp_path / "f1", WORDS + ["x1", "x2"], ["<tool>"], base=b, seed=1)
    _llama(tmp_path / "f2", list(reversed(WORDS)), ["<im>", "<tool>"], base=b, seed=2)
    return tmp_path


def _raw(d, source, method="task_arithmetic", **extra):
    tok = {"tokenizer": {"source": source, **extra}} if extra else {"tokenizer_source": source}
    return {"merge_method": method, "base_model": str(d / "b"), "dtype": "float32",
            "models": [{"model": str(d / m), "parameters": {"weight": w, "density": 0.6}}
                       for m, w in (("f1", 0.7), ("f2", 0.5))], **tok}


def _fastmerge(d, raw, name):
    out = d / name
    assert main(["merge", str(write_yaml(d / f"{name}.yml", raw)), str(out), "--quiet"]) == 0
    return out


def _mergekit(raw, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    run_merge(MergeConfiguration.model_validate(raw), str(out),
              options=MergeOptions(copy_tokenizer=True, lazy_unpickle=False))
    return state_dict_of(out)


@pytest.mark.parametrize("source,method,extra", [
    ("union", "task_arithmetic", {}), ("union", "ties", {}), ("base", "task_arithmetic", {}),
    ("union", "linear", {"pad_to_multiple_of": 16})])
def test_matches_mergekit(vocab_models, source, method, extra):
    pytest.importorskip("mergekit")
    d = vocab_models
    raw = _raw(d, source, method, **extra)
    if method == "linear":
        raw.pop("base_model")
    out = _fastmerge(d, raw, "fm")
    ours, theirs = state_dict_of(out), _mergekit(raw, d / "mk")
    ours_tok = transformers.AutoTokenizer.from_pretrained(out)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(d / "mk")
    vo, vm = ours_tok.get_vocab(), theirs_tok.get_vocab()
    # mergekit orders a model's new ordinary tokens by hash-map order (varies by run): the
    # same tokens, the base's at the same ids, and rows compared token by token
    assert set(vo) == set(vm)
    if "base_model" in raw:   # without one mergekit's reference model is a set's first
        assert all(vo[t] == vm[t] for t in WORDS)
    perm = torch.tensor([vm[t] for t, _ in sorted(vo.items(), key=lambda kv: kv[1])])
    assert set(ours) == set(theirs)
    for k in theirs:
        want = theirs[k]
        if k in (EMBED, HEAD):
            want = torch.cat([want[perm], want[len(perm):]])
        torch.testing.assert_close(ours[k], want, rtol=1e-5, atol=1e-6, msg=k)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == ours[EMBED].shape[0] == theirs[EMBED].shape[0]
    assert ours_tok.chat_template
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    model(torch.tensor([ours_tok("w1 x1 <tool> <im>")["input_ids"]]))


def test_union_rows_follow_tokens_not_positions(vocab_models):
    """Spelled out: a token all hold is the task-arithmetic merge of each model's own row of
    it; a token only one fine-tune holds is that model's row (mergekit's donor rule)."""
    d = vocab_models
    out = _fastmerge(d, _raw(d, "union"), "fm")
    got = state_dict_of(out)[EMBED]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sds = [state_dict_of(d / m)[EMBED] for m in ("b", "f1", "f2")]
    toks = [transformers.AutoTokenizer.from_pretrained(d / m).get_vocab()
            for m in ("b", "f1", "f2")]
    v = tok.get_vocab()
    rows = [s[t["w7"]] for s, t in zip(sds, toks)]
    want = rows[0] + 0.7 * (rows[1] - rows[0]) + 0.5 * (rows[2] - rows[0])
    torch.testing.assert_close(got[v["w7"]], want)
    assert v["w7"] == toks[0]["w7"]                     # base tokens keep their ids
    torch.testing.assert_close(got[v["x1"]], sds[1][toks[1]["x1"]])
    torch.testing.assert_close(got[v["<im>"]], sds[2][toks[2]["<im>"]])


def test_without_tokenizer_source_differing_vocabularies_are_one_line(vocab_models, capsys):
    d = vocab_models
    raw = _raw(d, "union")
    raw.pop("tokenizer_source")
    assert main(["merge", str(write_yaml(d / "c.yml", raw)), str(d / "o"), "--quiet"]) == 2 \
        or not (d / "o").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer_source" in err[0] and not (d / "o").exists()


def test_bad_tokenizer_and_foreign_source_are_one_line(vocab_models, capsys):
    d = vocab_models
    (d / "f2" / "tokenizer.json").write_text("{not json")
    assert main(["merge", str(write_yaml(d / "c.yml", _raw(d, "union"))), str(d / "o"),
                 "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer" in err[0] and "f2" in err[0], err
    assert not (d / "o").exists()
    _tokenizer(d / "other", WORDS)
    raw = _raw(d, f"model:{d / 'other'}")
    assert main(["merge", str(write_yaml(d / "c2.yml", raw)), str(d / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not one of the merge's models" in err[0], err
    assert not (d / "o").exists()


@pytest.mark.slow
def test_union_stays_under_the_memory_budget(tmp_path):
    """Embeddings and heads of 47 MiB per model (float32, 3 models: 280 MiB of token rows)
    merged under a 32 MiB budget: rows are gathered chunk by chunk, never whole. The three
    24k-token tokenizers transformers holds while the vocabulary is built (~5 MiB each, in
    proportion to the vocabulary, not the embeddings) get an allowance of their own."""
    words = [f"w{i}" for i in range(24000)]
    b = _llama(tmp_path / "b", words, hidden=512)
    _llama(tmp_path / "f1", words + ["x1"], ["<tool>"], base=b, seed=1, hidden=512)
    _llama(tmp_path / "f2", words[::-1], ["<im>"], base=b, seed=2, hidden=512)
    cfg = write_yaml(tmp_path / "c.yml", _raw(tmp_path, "union"))
    warm = tmp_path / "w"
    _llama(warm / "b", WORDS)
    _llama(warm / "f1", WORDS + ["x1"], seed=1)
    _llama(warm / "f2", WORDS, ["<im>"], seed=2)
    warm_cfg = write_yaml(tmp_path / "w.yml", _raw(warm, "union"))
    budget = 32 * 2 ** 20
    assert_rss_within(tmp_path, cfg, warm_cfg, budget, "torch",
                      allowance=16 * 2 ** 20)   # the tokenizers'
