"""Llama-shaped synthetic checkpoints of a chosen size, written at disk speed, for the
large-model benchmarks (benchmarks/bench_large.py); no network, no torch.

    python benchmarks/make_checkpoints.py /data/ckpt --size 7b --fine-tunes 2 --seed 0
    python benchmarks/make_checkpoints.py /tmp/ckpt --size 70b-layers --layers 4

writes OUT/base and OUT/ft1 .. OUT/ftN, each a Hugging Face checkpoint directory: bf16
safetensors shards (5 GB by default) + ``model.safetensors.index.json`` + a Llama
``config.json`` (hidden / intermediate size, heads, key-value heads, layers, vocab of the shape;
``70b-layers`` is Llama-2-70B's layer shape with fewer layers, 8 unless ``--layers``, and its
config says that many layers). A fine-tune is the base plus a small delta (a part shared by all
fine-tunes and a part of its own, 0.002 each, the base's weights 0.02, norms 1 + 0.02 noise).

Why it is fast: the noise is drawn once, vectorised (numpy's PCG64 16-bit integers looked up in
a table of normal quantiles), into one pool of
bf16 values per model (64 Mi values, 128 MiB) whose fine-tune pools are the base pool plus the
deltas; every tensor is then the pool read cyclically from its own seeded offset, so writing a
checkpoint is nothing but ``os.writev`` of pool slices (up to 128 MiB each) into the shard
files: no per-element work and no per-tensor copy. The same ``--seed`` gives byte-identical
files. The cost is that a tensor larger than the pool (the 7B embeddings: 131 Mi values)
repeats it, which does not matter to a merge's speed.

Measured on the 2-core VM of benchmarks/results/large.md, load ~1: ``--size 0.5b --fine-tunes
2`` (2.81 GB, each shard fsynced) in 2.6 and 3.8 s (1.08 and 0.74 GB/s, of which drawing the
pools 0.8-1.8 s); ``dd if=/dev/zero bs=64M conv=fsync`` of the same size just after: 5.3 and
5.7 s (0.53 and 0.50 GB/s). So: disk speed (this shared disk's speed varies 2x from run to run;
under a load of ~10 from other jobs the same command took 14-21 s). At 7B the pools (3 x 64 Mi
values) took 11 s at load ~9 (~2 s expected at load ~1), before ~40 GB of writing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np

# layers, hidden, intermediate, attention heads, key-value heads, vocab
SIZES = {
    "tiny": (2, 64, 172, 4, 4, 512),
    "0.2b": (12, 1024, 2816, 16, 16, 16000),
    "0.5b": (24, 1024, 4096, 16, 16, 32000),
    "7b": (32, 4096, 11008, 32, 32, 32000),        # Llama-2-7B
    "13b": (40, 5120, 13824, 40, 40, 32000),       # Llama-2-13B
    "70b-layers": (8, 8192, 28672, 64, 8, 32000),  # Llama-2-70B, 8 of its 80 layers
}
POOL = 1 << 26            # values per noise pool (128 MiB of bf16)
NORM_POOL = 1 << 16       # the norms' pool (1-D weights near 1)
BASE_STD, DELTA_STD = 0.02, 0.002
_MAX_WRITE = 1 << 30      # bytes per writev call (Linux caps one call near 2 GiB)
_IOV_MAX = 1024


class UserError(Exception):
    """A mistake in the arguments: reported as one line."""


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"--shard-size: cannot read {text!r} (e.g. 5GB, 512MiB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    return int(float(m.group(1)) * scale)


def shape_of(size: str, layers: int | None = None) -> dict:
    if size not in SIZES:
        raise UserError(f"--size: unknown size {size!r} (one of {', '.join(SIZES)})")
    n_layers, hidden, inter, heads, kv_heads, vocab = SIZES[size]
    if layers is not None:
        if layers < 1:
            raise UserError(f"--layers: must be at least 1, got {layers}")
        n_layers = layers
    return {"layers": n_layers, "hidden": hidden, "inter": inter, "heads": heads,
            "kv_heads": kv_heads, "vocab": vocab}


def tensor_layout(s: dict) -> list:
    """(name, shape, is_norm) in checkpoint order, Hugging Face Llama names."""
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"]
    out = [("model.embed_tokens.weight", (s["vocab"], h), False)]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), True),
                (p + "self_attn.q_proj.weight", (h, h), False),
                (p + "self_attn.k_proj.weight", (kv, h), False),
                (p + "self_attn.v_proj.weight", (kv, h), False),
                (p + "self_attn.o_proj.weight", (h, h), False),
                (p + "post_attention_layernorm.weight", (h,), True),
                (p + "mlp.gate_proj.weight", (s["inter"], h), False),
                (p + "mlp.up_proj.weight", (s["inter"], h), False),
                (p + "mlp.down_proj.weight", (h, s["inter"]), False)]
    out += [("model.norm.weight", (h,), True), ("lm_head.weight", (s["vocab"], h), False)]
    return out


def llama_config(s: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": s["hidden"], "intermediate_size": s["inter"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
            "num_hidden_layers": s["layers"], "vocab_size": s["vocab"],
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "bfloat16"}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even (the values are finite)."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def normal_table() -> np.ndarray:
    """The 65536 quantiles of the standard normal at (u + 0.5) / 65536, float32."""
    inv = NormalDist().inv_cdf
    return np.array([inv((u + 0.5) / 65536) for u in range(65536)], dtype=np.float32)


def noise_pools(n: int, mean: float, fine_tunes: int, rng: np.random.Generator,
                table: np.ndarray) -> list:
    """[base, ft1, ..]: bf16 bits of n values each; ft_k = base + shared delta + own delta.
    Normal noise as a table lookup of uniform 16-bit integers: 10x numpy's standard_normal,
    and finer than bf16 resolves."""
    def normal(std: float, offset: float = 0.0) -> np.ndarray:
        x = table.take(rng.integers(0, 65536, size=n, dtype=np.uint16))
        x *= np.float32(std)
        if offset:
            x += np.float32(offset)
        return x

    base = normal(BASE_STD, mean)
    pools = [to_bf16_bits(base)]
    if fine_tunes:
        base += normal(DELTA_STD)  # the delta every fine-tune shares
        for _ in range(fine_tunes):
            own = normal(DELTA_STD)
            own += base
            pools.append(to_bf16_bits(own))
    return pools


def plan_shards(layout: list, shard_bytes: int) -> list:
    """Tensors in order, greedily into shards of at most shard_bytes (a larger tensor alone)."""
    shards, cur, cur_bytes = [], [], 0
    for name, shape, is_norm in layout:
        nbytes = 2 * int(np.prod(shape))
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, is_norm))
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def cyclic_views(pool: np.ndarray, start: int, count: int) -> list:
    """Byte views of ``count`` values read from ``pool`` cyclically from ``start``."""
    views, mv, n = [], memoryview(pool).cast("B"), len(pool)
    pos = start % n
    while count:
        take = min(count, n - pos)
        views.append(mv[2 * pos:2 * (pos + take)])
        count -= take
        pos = 0
    return views


def write_all(fd: int, views: list) -> None:
    """os.writev in batches of at most _IOV_MAX buffers and _MAX_WRITE bytes, resuming on short
    writes."""
    i = 0
    while i < len(views):
        batch, nbytes = [], 0
        while i < len(views) and len(batch) < _IOV_MAX and nbytes < _MAX_WRITE:
            v = views[i]
            room = _MAX_WRITE - nbytes
            if len(v) > room:  # split a buffer that would overflow the batch
                views[i:i + 1] = [v[:room], v[room:]]
                v = views[i]
            batch.append(v)
            nbytes += len(v)
            i += 1
        while batch:
            done = os.writev(fd, batch)
            while batch and done >= len(batch[0]):
                done -= len(batch[0])
                batch.pop(0)
            if batch and done:
                batch[0] = batch[0][done:]


def safetensors_header(tensors: list) -> bytes:
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        nbytes = 2 * int(np.prod(shape))
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_checkpoint(target: Path, shards: list, pools: dict, offsets: dict, which: int,
                     config: dict) -> int:
    """One checkpoint directory, written under a temporary name and renamed; returns bytes."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide the checkpoint from other users
        weight_map, total = {}, 0
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(len(shards))]
        for fname, tensors in zip(names, shards):
            views = [memoryview(safetensors_header(tensors))]
            for name, shape, is_norm in tensors:
                pool = pools["norm" if is_norm else "weight"][which]
                views += cyclic_views(pool, offsets[name], int(np.prod(shape)))
                weight_map[name] = fname
                total += 2 * int(np.prod(shape))
            fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, views)
                os.fsync(fd)
                # the inputs are read cold by the benchmark: keep them out of the page cache
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total


def param_count(size: str, layers: int | None = None) -> int:
    return sum(int(np.prod(shape)) for _, shape, _ in tensor_layout(shape_of(size, layers)))


def total_bytes(size: str, layers: int | None = None, fine_tunes: int = 2) -> int:
    """Bytes of tensor data all the checkpoints of these arguments hold (bf16)."""
    return (1 + fine_tunes) * 2 * param_count(size, layers)


def layers_that_fit(size: str, room: int, copies: int) -> int:
    """The most layers (at most the size's own count) for which ``copies`` bf16 checkpoints of
    ``size``'s tensor shapes fit in ``room`` bytes; 0 if not even one layer does. For benchmarks
    of a large shape on a smaller disk (``--layers`` here)."""
    best = 0
    for n in range(1, SIZES[size][0] + 1):
        if copies * 2 * param_count(size, n) > room:
            break
        best = n
    return best


def make_checkpoints(out, size: str = "0.5b", layers: int | None = None, fine_tunes: int = 2,
                     seed: int = 0, shard_size="5GB", log=print) -> dict:
    """Writes OUT/base and OUT/ft1..ftN; returns {"base", "models", "bytes", "params",
    "seconds", "config"}. Refuses (UserError) to replace an existing directory."""
    out = Path(out)
    s = shape_of(size, layers)
    if fine_tunes < 0:
        raise UserError(f"--fine-tunes: must be 0 or more, got {fine_tunes}")
    shard_bytes = parse_bytes(shard_size) if isinstance(shard_size, str) else int(shard_size)
    if shard_bytes <= 0:
        raise UserError(f"--shard-size: must be positive, got {shard_size!r}")
    targets = [out / "base"] + [out / f"ft{i + 1}" for i in range(fine_tunes)]
    for t in targets:
        if t.exists():
            raise UserError(f"{t}: already exists (remove it or choose another OUT_DIR)")
    out.mkdir(parents=True, exist_ok=True)
    layout = tensor_layout(s)
    params = sum(int(np.prod(shape)) for _, shape, _ in layout)
    biggest = max(int(np.prod(shape)) for _, shape, n in layout if not n)
    t0 = time.perf_counter()
    rng = np.random.Generator(np.random.PCG64(seed))
    table = normal_table()
    pools = {"weight": noise_pools(min(POOL, biggest), 0.0, fine_tunes, rng, table),
             "norm": noise_pools(min(NORM_POOL, s["hidden"]), 1.0, fine_tunes, rng, table)}
    offsets = {name: int(o) for (name, _, is_norm), o in
               zip(layout, rng.integers(0, POOL, size=len(layout)))}
    t_pools = time.perf_counter() - t0
    shards = plan_shards(layout, shard_bytes)
    config = llama_config(s)
    written = 0
    for which, target in enumerate(targets):
        written += write_checkpoint(target, shards, pools, offsets, which, config)
    dt = time.perf_counter() - t0
    log(f"{len(targets)} checkpoints of {params / 1e9:.3f}B parameters ({size}, "
        f"{s['layers']} layers, {len(shards)} shards each): {written / 1e9:.2f} GB in "
        f"{dt:.1f} s ({written / dt / 1e6:.0f} MB/s; noise pools {t_pools:.1f} s)")
    return {"base": targets[0], "models": targets[1:], "bytes": written, "params": params,
            "seconds": dt, "config": config}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="writes OUT_DIR/base and OUT_DIR/ft1 .. ftN")
    p.add_argument("--size", default="0.5b", choices=list(SIZES))
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--fine-tunes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", default="5GB")
    args = p.parse_args(argv)
    try:
        make_checkpoints(args.out_dir, args.size, args.layers, args.fine_tunes, args.seed,
                         args.shard_size)
    except UserError as e:
        print(f"make_checkpoints: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"make_checkpoints: {e.filename or args.out_dir}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
