"""benchmarks/make_checkpoints.py: a tiny checkpoint set loads with safetensors (and transformers'
LlamaConfig where installed), is sharded with a correct index, and the same seed gives the
same bytes."""
import hashlib
import json
import math
from pathlib import Path

import pytest
from bench_util import load_benchmark


def _module():
    return load_benchmark("make_checkpoints.py", "make_checkpoints")


mc = _module()


def _digest(directory: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.iterdir())}


def _make(out, seed=0):
    return mc.make_checkpoints(out, size="tiny", fine_tunes=2, seed=seed,
                               shard_size="100KB", log=lambda *_: None)


def test_tiny_loads_sharded_with_index_and_config(tmp_path):
    from safetensors import safe_open
    made = _make(tmp_path / "ckpt")
    layers, hidden, inter, heads, kv_heads, vocab = mc.SIZES["tiny"]
    layout = {name: shape for name, shape, _ in mc.tensor_layout(mc.shape_of("tiny"))}
    for d in [made["base"], *made["models"]]:
        index = json.loads((d / "model.safetensors.index.json").read_text())
        shards = sorted(d.glob("*.safetensors"))
        assert len(shards) > 1 and set(index["weight_map"].values()) == {f.name for f in shards}
        assert index["metadata"]["total_size"] == 2 * sum(map(math.prod, layout.values()))
        seen = {}
        for f in shards:
            with safe_open(str(f), "pt") as st:
                for name in sorted(st.keys()):
                    assert index["weight_map"][name] == f.name
                    seen[name] = st.get_tensor(name)
        assert {n: tuple(t.shape) for n, t in seen.items()} == layout
        assert all(str(t.dtype) == "torch.bfloat16" for t in seen.values())
        cfg = json.loads((d / "config.json").read_text())
        assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                cfg["num_attention_heads"], cfg["vocab_size"]) == (hidden, inter, layers,
                                                                   heads, vocab)
    try:
        from transformers import LlamaConfig
    except ImportError:
        LlamaConfig = None
    if LlamaConfig is not None:
        c = LlamaConfig.from_pretrained(str(made["base"]))
        assert (c.hidden_size, c.num_key_value_heads) == (hidden, kv_heads)


def test_fine_tunes_are_small_deltas_of_the_base(tmp_path):
    from safetensors.torch import load_file
    made = _make(tmp_path / "ckpt")

    def load(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    base, ft1, ft2 = (load(d) for d in [made["base"], *made["models"]])
    w = "model.layers.1.mlp.up_proj.weight"
    delta1, delta2 = ft1[w].float() - base[w].float(), ft2[w].float() - base[w].float()
    assert 0.01 < base[w].float().std() < 0.03
    assert 0.001 < delta1.std() < 0.005 and not delta1.equal(delta2)
    assert abs(base["model.norm.weight"].float().mean() - 1) < 0.01


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = _make(tmp_path / "a"), _make(tmp_path / "b"), _make(tmp_path / "c", seed=1)
    for x, y, z in zip([a["base"], *a["models"]], [b["base"], *b["models"]],
                       [c["base"], *c["models"]]):
        assert _digest(x) == _digest(y)
        assert _digest(x) != _digest(z)


def test_existing_output_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "keep").write_text("mine")
    assert mc.main([str(tmp_path), "--size", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already exists" in err
    assert (tmp_path / "base" / "keep").read_text() == "mine"
    assert not (tmp_path / "ft1").exists()


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10 ** 9), ("512MiB", 512 << 20),
                                           ("100KB", 100_000)])
def test_shard_sizes(text, expected):
    assert mc.parse_bytes(text) == expected


def test_layer_override_and_70b_shape():
    s = mc.shape_of("70b-layers", layers=2)
    assert s["layers"] == 2 and s["hidden"] == 8192
    shapes = {n: sh for n, sh, _ in mc.tensor_layout(s)}
    # 8 key-value heads of 128
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 8192)
    with pytest.raises(mc.UserError):
        mc.shape_of("3b")


def _bench_large():
    return load_benchmark("bench_large.py", "bench_large", on_path=True)


def test_bench_large_refuses_without_the_disk_and_creates_nothing(tmp_path, capsys):
    bl = _bench_large()
    work = tmp_path / "work"
    assert bl.main(["--size", "70b-layers", "--layers", "800", "--workdir", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GB free" in err and "needs" in err
    assert not work.exists()


def test_bench_large_keeps_the_notes_section(tmp_path):
    bl = _bench_large()
    out = tmp_path / "large.md"
    out.write_text(f"# old table\n\n{bl.NOTES}\n## where the time goes\nkept\n")
    text = bl.keep_notes(out, "# new table\n")
    assert text.startswith("# new table") and "old table" not in text
    assert text.endswith(f"{bl.NOTES}\n## where the time goes\nkept\n")
