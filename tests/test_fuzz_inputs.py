"""Seeded fuzz of what fastmerge reads: safetensors headers and index files, differential
against the safetensors library.

Every case ends in a CheckpointError with a one-line message, or a correct read: a file the
library refuses is never read, a file it accepts is read with identical tensors. Two refusals
go beyond the library's, by design: a tensor name repeated in one header (the library keeps
the last) and a dtype fastmerge does not read ("unsupported dtype"). CI runs 500 header cases,
100 index cases and 20 whole merges; FASTMERGE_FUZZ_CASES=N runs N header cases (and N/5,
N/25 of the others)."""
from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge.checkpoint import safetensors_file as checkpoint_io
from fastmerge.checkpoint.safetensors_file import Checkpoint, CheckpointError, SafetensorsFile
from fastmerge.cli import main as cli_main
from fastmerge.cli.demo import save_checkpoint

CASES = int(os.environ.get("FASTMERGE_FUZZ_CASES", "500"))
SEED = 17
BEYOND_THE_LIBRARY = ("tensor name appears twice in the header", "unsupported dtype")
LIB_DTYPES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
              "U32", "F32", "F64", "I64", "U64", "F4", "F6_E2M3", "F8_E8M0", "C64"]
JUNK_DTYPES = ["f32", "", "F32 ", "float32", 1, None, ["F32"], {"F32": None}, {"F32": 1}]
ODD_VALUES = [-1, 0, 1, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 1.0, True, "2", None,
              [], {}]


def base_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"w.f32": torch.randn(2, 3, generator=g),
            "w.bf16": torch.randn(4, generator=g).bfloat16(),
            "w.f16": torch.randn(3, generator=g).half(), "ids": torch.tensor([3, -4]),
            "flag": torch.tensor([True, False, True]), "empty": torch.zeros(0)}


def split(blob: bytes):
    (n,) = struct.unpack("<Q", blob[:8])
    pairs = json.loads(blob[8:8 + n], object_pairs_hook=list)
    return pairs, blob[8 + n:]


def dump(v) -> str:
    """JSON text of ``v`` where lists of pairs (from ``split``) stay objects, repeats and all."""
    if isinstance(v, Obj):
        return "{" + ",".join(json.dumps(k) + ":" + dump(x) for k, x in v) + "}"
    if isinstance(v, list) and v and all(isinstance(p, tuple) for p in v):
        return "{" + ",".join(json.dumps(k) + ":" + dump(x) for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(k) + ":" + dump(x) for k, x in v.items()) + "}"
    return json.dumps(v)


class Obj(list):
    """An object as (key, value) pairs, written by ``dump`` with repeats kept."""


def nested(depth: int, rng) -> str:
    if rng.random() < 0.5:
        return "[" * depth + "]" * depth
    return '{"k":' * depth + "1" + "}" * depth


def mutate_header(blob: bytes, rng: random.Random) -> bytes:
    """One to three mutations of a valid file, at the JSON level, then the bytes."""
    pairs, data = split(blob)
    pairs = [(k, Obj(v) if isinstance(v, list) and k != "__metadata__" else v)
             for k, v in pairs]
    text_extra, raw_ops = None, []
    tensors = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]
    for _ in range(rng.choice([1, 1, 2, 3])):
        i = rng.choice(tensors)
        name, e = pairs[i]
        fields = dict(e) if isinstance(e, Obj) else None
        op = rng.randrange(22)
        if fields is None and op in range(2, 10):
            op = 0
        try:
            if op == 0:
                raw_ops.append(("flip", rng.randrange(1 << 30), rng.randrange(256)))
            elif op == 1:
                raw_ops.append(("hlen", rng.choice([-9, -8, -1, 1, 8, 64, 2 ** 63, 100_000_001,
                                                    -10 ** 9])))
            elif op == 2:   # offsets shifted / reversed / overlapping another tensor's
                b, en = fields["data_offsets"]
                kind = rng.randrange(4)
                if kind == 0:
                    d = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
                    fields["data_offsets"] = [max(0, b + d), max(0, en + d)]
                elif kind == 1:
                    fields["data_offsets"] = [en, b]
                elif kind == 2:
                    _, other = pairs[rng.choice(tensors)]
                    if isinstance(other, Obj):
                        fields["data_offsets"] = list(dict(other)["data_offsets"])
                else:
                    fields["data_offsets"] = [b, en + rng.choice([-1, 1, 7])]
            elif op == 3:   # shape changed
                shape = list(fields["shape"])
                kind = rng.randrange(3)
                if kind == 0 and shape:
                    shape[rng.randrange(len(shape))] = rng.choice(ODD_VALUES)
                elif kind == 1:
                    shape.append(rng.choice([1, 2, 0, 2 ** 32]))
                else:
                    shape = shape[:-1] if shape else [rng.choice([1, 2])]
                fields["shape"] = shape
            elif op == 4:
                fields["dtype"] = rng.choice(LIB_DTYPES + JUNK_DTYPES)
            elif op == 5:   # a required field missing
                del fields[rng.choice(["dtype", "shape", "data_offsets"])]
            elif op == 6:   # extra fields, which the library ignores
                fields[rng.choice(["x", "extra", "offsets"])] = rng.choice(
                    [1, "s", [1, {"y": None}], 1e300, -5, 10 ** 30])
            elif op == 7:   # deeply nested extra field
                text_extra = (i, nested(rng.choice([5, 100, 124, 125, 126, 127, 300, 5000]), rng))
            elif op == 8:   # entry as the [dtype, shape, offsets] sequence serde also reads
                pairs[i] = (name, [fields["dtype"], fields["shape"], fields["data_offsets"]])
                continue
            elif op == 9:   # data_offsets odd types
                fields["data_offsets"] = rng.choice([[0], [0, 1, 2], None, "0,8", [0.0, 8],
                                                     [-1, 8], [0, 2 ** 64]])
            elif op == 10:  # a duplicate key
                pairs.insert(rng.randrange(len(pairs) + 1), (name, e))
                continue
            elif op == 11:
                meta = rng.choice([{"k": 1}, [], "s", None, {"k": {"x": "y"}}, {},
                                   Obj([("k", "v"), ("k", "w")]), {"k": None}])
                pairs = [p for p in pairs if p[0] != "__metadata__"]
                pairs.insert(0, ("__metadata__", meta))
                tensors = [j for j, (k, _) in enumerate(pairs) if k != "__metadata__"]
                continue
            elif op == 12:
                raw_ops.append(("append", rng.choice([1, 2, 8, 100])))
            elif op == 13:
                raw_ops.append(("truncate", rng.choice([1, 2, 8, 16, 10 ** 6])))
            elif op == 14:
                raw_ops.append(("pad", rng.choice([b"  ", b"\t\n\r ", b"\0", b"\0\0\0", b"x"]),
                                rng.random() < 0.5))
            elif op == 15:
                raw_ops.append(("badutf8", rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])))
            elif op == 16:  # odd tokens the two JSON parsers read differently
                tok = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-0", "02", "1.5e3",
                                  '"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', "9" * 400])
                text_extra = (i, tok)
            elif op == 17:  # a name renamed to odd strings
                new = rng.choice(["", "\u00e9t\u00e9", "a" * 5000, "\0", "__metadata_"])
                pairs[i] = (new, e)
                continue
            elif op == 18:
                raw_ops.append(("toplevel", rng.choice([b"[]", b'"s"', b"1", b"null", b"{"])))
            elif op == 19:  # two tensors swap offsets (both still cover the data)
                j = rng.choice(tensors)
                _, other = pairs[j]
                if isinstance(other, Obj) and j != i:
                    o = dict(other)
                    fields["data_offsets"], o["data_offsets"] = o["data_offsets"], \
                        fields["data_offsets"]
                    pairs[j] = (pairs[j][0], Obj(o.items()))
            elif op == 20:
                fields["dtype"] = rng.choice([{"F32": None}, {"BF16": None}])
            elif op == 21:
                raw_ops.append(("deep_top", rng.choice([126, 127, 128, 3000])))
        except (KeyError, TypeError, ValueError, IndexError):  # an earlier op broke it
            continue
        if fields is not None:
            pairs[i] = (name, Obj(fields.items()))
    parts = []
    for j, (k, v) in enumerate(pairs):
        val = dump(v)
        if text_extra is not None and text_extra[0] == j and val.startswith("{"):
            val = val[:-1] + ("," if val != "{}" else "") + '"zz":' + text_extra[1] + "}"
        parts.append(json.dumps(k) + ":" + val)
    header = ("{" + ",".join(parts) + "}").encode()
    hlen_delta, tail = 0, data
    for op in raw_ops:
        if op[0] == "flip":
            b = bytearray(header)
            b[op[1] % len(b)] = op[2]
            header = bytes(b)
        elif op[0] == "hlen":
            hlen_delta = op[1]
        elif op[0] == "append":
            tail = tail + bytes(op[1])
        elif op[0] == "pad":
            header = header + op[1] if op[2] else op[1].replace(b"\0", b" ") + header
        elif op[0] == "badutf8":
            at = header.find(b'"') + 1
            header = header[:at] + op[1] + header[at:]
        elif op[0] == "toplevel":
            header = op[1]
        elif op[0] == "deep_top":
            header = header[:-1] + b',"zz":' + b"[" * op[1] + b"]" * op[1] + b"}"
    hlen = max(0, len(header) + hlen_delta) % (1 << 64)
    blob = struct.pack("<Q", hlen) + header + tail
    for op in raw_ops:
        if op[0] == "truncate":
            blob = blob[:max(0, len(blob) - op[1])]
    return blob


def library_reads(path: Path):
    """The library's tensors, or None where it refuses the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


def fastmerge_reads(path: Path):
    """fastmerge's tensors (torch.Tensor of the file's shape), or the CheckpointError."""
    try:
        f = SafetensorsFile(path)
    except CheckpointError as exc:
        return exc
    try:
        return {n: f.read(n).reshape(i.shape) for n, i in f.tensors.items()}
    finally:
        f.close()


def check_case(path: Path, why: str):
    want, got = library_reads(path), fastmerge_reads(path)
    if isinstance(got, CheckpointError):
        assert "\n" not in str(got) and len(str(got)) < 1000, (why, str(got))
        assert want is None or any(r in str(got) for r in BEYOND_THE_LIBRARY), \
            f"{why}: the library reads it but fastmerge refused: {got}"
        return "refused"
    assert want is not None, f"{why}: the library refuses it but fastmerge read it"
    assert set(got) == set(want), why
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (why, k)
        assert torch.equal(got[k].reshape(-1).view(torch.uint8),
                           want[k].reshape(-1).view(torch.uint8)), (why, k)
    return "read"


def test_fuzz_headers_against_the_safetensors_library(tmp_path):
    clean = tmp_path / "clean.safetensors"
    save_file(base_tensors(), str(clean), metadata={"format": "pt"})
    blob = clean.read_bytes()
    seen = {"read": 0, "refused": 0}
    for case in range(CASES):
        rng = random.Random(SEED * 1_000_003 + case)
        p = tmp_path / "case.safetensors"
        p.write_bytes(mutate_header(blob, rng))
        seen[check_case(p, f"header case {case} (seed {SEED})")] += 1
    # the mutations reach both verdicts, not just one
    assert seen["read"] > CASES // 20 and seen["refused"] > CASES // 2, seen


# ------------------------------------------------------------------------ index files
def mutate_index(d: Path, outside: Path, rng: random.Random) -> str:
    doc = json.loads((d / "model.safetensors.index.json").read_text())
    wm = doc["weight_map"]
    names = list(wm)
    op = rng.randrange(12)
    if op == 0:
        doc["weight_map"] = rng.choice([[], "x", None, 3, {}, [["a", "b"]]])
    elif op == 1:
        wm[rng.choice(names)] = rng.choice([1, None, [], {}, "", "\0x.safetensors"])
    elif op == 2:   # traversal
        wm[rng.choice(names)] = rng.choice(["../outside/x.safetensors", str(outside),
                                            "link.safetensors", "./../m/" + wm[names[0]],
                                            "sub/../" + wm[names[0]]])
    elif op == 3:
        wm[rng.choice(names)] = rng.choice(["nope.safetensors", "y" * 5000, "dir.safetensors",
                                            "dangling.safetensors"])
    elif op == 4:
        wm["ghost"] = wm[names[0]]
    elif op == 5:
        del wm[rng.choice(names)]
    elif op == 6:
        text = json.dumps(doc)
        return text[:rng.randrange(len(text))]
    elif op == 7:
        b = bytearray(json.dumps(doc).encode())
        b[rng.randrange(len(b))] = rng.randrange(256)
        return b.decode("latin-1")
    elif op == 8:
        return "[" * rng.choice([10, 5000, 100000])
    elif op == 9:
        k = rng.choice(names)
        return json.dumps(doc)[:-2] + f', {json.dumps(k)}: {json.dumps(wm[k])}}}}}'
    elif op == 10:
        return json.dumps(rng.choice([[doc], "s", None, 1]))
    else:
        doc["weight_map"] = {k: v for k, v in reversed(list(wm.items()))}
    return json.dumps(doc)


def test_fuzz_index_files(tmp_path, monkeypatch):
    outside = tmp_path / "outside" / "x.safetensors"
    outside.parent.mkdir()
    save_file({"a": torch.ones(2)}, str(outside))
    opened = []
    real = getattr(checkpoint_io, "open_regular", None)
    monkeypatch.setattr(checkpoint_io, "open_regular",
                        lambda p, what: opened.append(Path(p)) or real(p, what), raising=False)
    tensors = {"a": torch.ones(2), "b": torch.arange(3.0), "c": torch.zeros(2, 2)}
    d = tmp_path / "m"
    save_checkpoint(d, tensors, shards=2, tokenizer=False)
    (d / "link.safetensors").symlink_to(outside)
    (d / "dangling.safetensors").symlink_to(tmp_path / "gone")
    (d / "dir.safetensors").mkdir()
    (d / "sub").mkdir()
    clean = (d / "model.safetensors.index.json").read_text()
    for case in range(max(1, CASES // 5)):
        rng = random.Random(SEED * 7919 + case)
        (d / "model.safetensors.index.json").write_bytes(
            mutate_index(d, outside, rng).encode("utf-8", "surrogateescape"))
        opened.clear()
        try:
            ck = Checkpoint(d)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 1000, (case, str(exc))
        else:
            # exactly what the index lists (a shard it does not name is not read)
            listed = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
            assert set(ck.names) == set(listed) <= set(tensors), case
            for k in ck.names:
                assert torch.equal(ck.read(k).reshape(ck.info(k).shape), tensors[k]), (case, k)
            ck.close()
        root = d.resolve()
        assert all(root in p.resolve().parents for p in opened), (case, opened)
        (d / "model.safetensors.index.json").write_text(clean)


# ----------------------------------------------------------------------- whole merges
def test_fuzz_whole_merges(tmp_path):
    """Mutated shards through merge_checkpoints and the CLI: a clear error and no OUT_DIR, or
    the merge of what the safetensors library reads."""
    g = torch.Generator().manual_seed(1)
    ref = {"w.f32": torch.randn(2, 3, generator=g),
           "w.bf16": torch.randn(4, generator=g).bfloat16(),
           "w.f16": torch.randn(3, generator=g).half()}
    m0, m1 = tmp_path / "m0", tmp_path / "m1"
    save_checkpoint(m0, ref, tokenizer=False)
    other = {k: (v.float() * 2 + 1).to(v.dtype) for k, v in ref.items()}
    save_checkpoint(m1, other, tokenizer=False)
    shard = m1 / "model.safetensors"
    clean = shard.read_bytes()
    cfg = {"merge_method": "linear", "models": [{"model": str(m0), "parameters": {"weight": 0.5}},
                                                {"model": str(m1), "parameters": {"weight": 0.5}}]}
    cfg_file = tmp_path / "cfg.yml"
    cfg_file.write_text(json.dumps(cfg))
    outcomes = set()
    for case in range(max(1, CASES // 25)):
        rng = random.Random(SEED * 104729 + case)
        shard.write_bytes(mutate_header(clean, rng))
        out = tmp_path / f"out{case}"
        lib = library_reads(shard)
        if case % 4 == 3:
            rc = cli_main(["merge", str(cfg_file), str(out), "--quiet"])
            assert rc in (0, 1, 2), (case, rc)
            ok = rc == 0
        else:
            try:
                fastmerge.merge_checkpoints(cfg, out, backend="torch")
                ok = True
            except CheckpointError as exc:
                assert "\n" not in str(exc), (case, str(exc))
                ok = False
        outcomes.add(ok)
        if not ok:
            assert not out.exists() and not [p for p in tmp_path.iterdir()
                                              if out.name + "." in p.name], case
            continue
        assert lib is not None, f"merge case {case}: merged a file the library refuses"
        got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
        for k, a in ref.items():
            b = lib[k]
            want = fastmerge.merge_tensors(None, [a, b], "linear", weights=[0.5, 0.5],
                                           backend="torch", out_dtype=a.dtype)
            assert torch.equal(got[k], want), (case, k)
    assert outcomes == {True, False} or CASES < 100
