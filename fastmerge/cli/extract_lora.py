"""``fastmerge extract-lora FINETUNE BASE OUT --rank R``: a peft LoRA adapter approximating a
fine-tune as its base plus low-rank deltas (the inverse of a ``base+adapter`` input, like
mergekit-extract-lora). Per target tensor, one at a time: ``delta = W_ft - W_base`` in
float32, truncated SVD ``delta ~ U_r S_r V_r^T``, stored as ``lora_B = U_r S_r`` and
``lora_A = V_r^T`` with ``lora_alpha = r`` (scale 1), so ``W_base + B @ A`` approximates
``W_ft``. Small matrices use torch.linalg.svd; large ones a randomized SVD
(torch.svd_lowrank, a few power iterations). Each tensor's relative error
``||delta - B A||_F / ||delta||_F`` is printed and written to ``lora_extraction.json``.
Targets: every 2-D ``.weight`` whose module matches ``--target-modules`` (peft's rule: the
module name or its last parts), by default every 2-D weight except token embeddings and LM
heads. Tensors outside the targets are not carried (the adapter holds only LoRA weights).
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Optional, Sequence

from ..checkpoint.embeddings import VOCAB_TENSORS
from ..checkpoint.safetensors_file import MERGEABLE_ST, CheckpointError, quote
from ..checkpoint.sources import open_model
from ..output.writer import AtomicDirectory, output_dir_at_start, parse_size
from ..recipe.config import ConfigError

PEFT_PREFIX = "base_model.model."
FULL_SVD_MAX = 2048          # min(rows, cols) up to which the exact SVD is used
OVERSAMPLE, POWER_ITERS = 10, 4
REPORT = "lora_extraction.json"


def _is_vocab(name: str) -> bool:
    return name in VOCAB_TENSORS or name.endswith(tuple("." + v for v in VOCAB_TENSORS))


def targets_of(names: list, info, target_modules: Optional[Sequence[str]]) -> list:
    """The tensors to extract: 2-D float ``<module>.weight``s, matched like peft's
    target_modules, else all but token embeddings and LM heads."""
    out = []
    for n in names:
        i = info(n)
        if not n.endswith(".weight") or len(i.shape) != 2 or i.st not in MERGEABLE_ST:
            continue
        module = n[:-len(".weight")]
        if target_modules:
            if not any(module == t or module.endswith("." + t) for t in target_modules):
                continue
        elif _is_vocab(n):
            continue
        out.append(n)
    return out


def working_bytes(rows: int, cols: int, rank: int) -> int:
    """float32 bytes one tensor's extraction holds at its peak (delta, factors, residual)."""
    k = min(rows, cols)
    if k <= FULL_SVD_MAX:
        return 4 * (3 * rows * cols + k * (rows + cols + 1))
    q = rank + OVERSAMPLE
    return 4 * (3 * rows * cols + 3 * q * (rows + cols))


def low_rank(delta, rank: int):
    """(B [rows, r], A [r, cols]) with B @ A the best rank-r approximation of ``delta``
    (randomized for large matrices)."""
    import torch
    r = min(rank, *delta.shape)
    if min(delta.shape) <= FULL_SVD_MAX:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        torch.manual_seed(0)   # the range finder's test matrix: the same adapter every run
        u, s, v = torch.svd_lowrank(delta, q=min(r + OVERSAMPLE, *delta.shape),
                                    niter=POWER_ITERS)
        vh = v.T
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()


def extract_lora(finetune: str, base: str, out_dir, rank: int,
                 target_modules: Optional[Sequence[str]] = None, memory_budget=None,
                 overwrite: bool = False, quiet: bool = False) -> dict:
    """Write the adapter to ``out_dir`` (atomically); returns {tensor: relative error}."""
    import torch
    from safetensors.torch import save_file
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--rank: must be a positive integer, got {rank!r}")
    budget = parse_size(memory_budget, "memory budget") if memory_budget is not None else None
    out_dir = output_dir_at_start(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; pass --overwrite")
    ft = open_model(finetune)
    try:
        bs = open_model(base)
    except BaseException:
        ft.close()
        raise
    try:
        names = targets_of(bs.names, bs.info, target_modules)
        if not names:
            raise ConfigError(f"--target-modules: no 2-D weight of {quote(base)} matches "
                              f"{list(target_modules or [])}")
        for n in names:
            if n not in ft.where:
                raise CheckpointError(f"fine-tune {quote(finetune)} has no tensor {quote(n)} "
                                      f"(held by {bs.path_of(n)})")
            if ft.info(n).shape != bs.info(n).shape:
                raise CheckpointError(f"tensor {quote(n)}: shape {list(ft.info(n).shape)} in "
                                      f"{ft.path_of(n)} but {list(bs.info(n).shape)} in "
                                      f"{bs.path_of(n)}")
            need = working_bytes(*bs.info(n).shape, rank)
            if budget is not None and need > budget:
                raise ConfigError(f"tensor {quote(n)}: its extraction needs about "
                                  f"{need / 2 ** 20:.1f} MiB, over the memory budget "
                                  f"{budget / 2 ** 20:.1f} MiB; raise --memory-budget")
        weights, errors, used = {}, {}, set()
        for n in names:
            shape = bs.info(n).shape
            delta = ft.read(n).float().reshape(shape)
            delta -= bs.read(n).float().reshape(shape)
            b, a = low_rank(delta, rank)
            norm = float(torch.linalg.norm(delta))
            delta -= b @ a
            errors[n] = float(torch.linalg.norm(delta)) / norm if norm > 0 else 0.0
            del delta
            module = n[:-len(".weight")]
            used.add(module.rsplit(".", 1)[-1])
            weights[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
            weights[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
            if not quiet:
                print(f"{n:<60} {list(shape)!s:>16} rel. error {errors[n]:.3e}")
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
                  "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
                  "target_modules": sorted(set(target_modules or used)),
                  "base_model_name_or_path": str(base), "fan_in_fan_out": False,
                  "use_rslora": False, "init_lora_weights": True, "inference_mode": True}
        with AtomicDirectory(out_dir, overwrite) as adir:
            save_file(weights, str(adir.tmp / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            (adir.tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (adir.tmp / REPORT).write_text(json.dumps(
                {"rank": rank, "finetune": str(finetune), "base": str(base),
                 "relative_error": errors}, indent=2) + "\n")
            adir.commit()
        return errors
    finally:
        ft.close()
        bs.close()


class _Parser(argparse.ArgumentParser):
    """argparse whose complaint is one error line with exit status 2 (a ConfigError)."""

    def error(self, message):
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastmerge extract-lora",
                                description="Extract a peft LoRA adapter (FINETUNE - BASE, "
                                            "truncated SVD per tensor).")
    p.add_argument("finetune", help="the fine-tuned model (directory or hub id)")
    p.add_argument("base", help="its base model (directory or hub id)")
    p.add_argument("out_dir", help="the adapter directory to write (atomically)")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank r")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="module names (peft's target_modules; default: every 2-D weight but "
                        "embeddings and LM heads)")
    p.add_argument("--memory-budget", default=None,
                   help="refuse a tensor whose extraction would need more, e.g. 8GiB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no per-tensor table")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    return p


def main(argv: list) -> int:
    args = build_parser().parse_args(argv)
    errors = extract_lora(args.finetune, args.base, args.out_dir, args.rank,
                          args.target_modules, args.memory_budget, args.overwrite, args.quiet)
    worst = max(errors.values()) if errors else 0.0
    print(f"fastmerge: extracted a rank-{args.rank} LoRA of {len(errors)} tensors (largest "
          f"relative error {worst:.3e}) -> {args.out_dir}")
    return 0 if math.isfinite(worst) else 1
