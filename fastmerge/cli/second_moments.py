"""Extract Adam second moments (``exp_avg_sq``) from a torch optimizer checkpoint into a
safetensors file named like the weights, for the curvature methods (ffg, ota, ota_ffg) and the
engine's per-model ``preconditioner_path``.

A torch optimizer ``state_dict`` (Hugging Face Trainer's ``optimizer.pt`` is one) keys its
state by parameter *index*: the position of the parameter in the order it was given to the
optimizer, across ``param_groups``. The names come from the model: ``model.named_parameters()``
order (trainable parameters only) is what ``Trainer`` and ``torch.optim.AdamW(model.parameters())``
use. Give the model as an ``nn.Module``, a list of names in optimizer order, or a Hugging Face
model directory (its config is instantiated on the meta device to list the parameters; needs
transformers).

The checkpoint is loaded with ``torch.load(..., weights_only=True)``: no pickled code runs.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..methods.moments import finite_non_negative


def parameter_names(model) -> list[str]:
    """Trainable parameter names in ``named_parameters()`` order."""
    if isinstance(model, torch.nn.Module):
        return [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(model, (list, tuple)):
        return [str(n) for n in model]
    path = Path(model)
    if path.is_file():  # a text file: one name per line, in optimizer order
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if (path / "config.json").is_file():
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as exc:  # pragma: no cover
            raise ValueError(f"{path}: listing a model's parameters from its config needs "
                             f"transformers ({exc}); pass a names file instead") from exc
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(config)
        return parameter_names(module)
    raise ValueError(f"{model!r}: give an nn.Module, a list of names, a names file or a model "
                     f"directory with config.json")


def load_optimizer_state(path: Union[str, os.PathLike]) -> dict:
    """``torch.load(path, weights_only=True)``, with an error naming the file if it is not an
    optimizer state_dict."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a loadable torch checkpoint under weights_only=True "
                         f"({exc})") from exc
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError(f"{path}: not a torch optimizer state_dict (no 'state'/'param_groups')")
    return sd


def check_output_file(out_path, overwrite: bool, inputs=()) -> None:
    """Before any work: an existing ``out_path`` needs ``overwrite``, and it may never be one of
    ``inputs`` (the optimizer checkpoint, the names file)."""
    out = Path(out_path)
    for p in inputs:
        if isinstance(p, (str, os.PathLike)) and os.path.exists(p) and \
                os.path.realpath(p) == os.path.realpath(out):
            raise ValueError(f"output file {out} is the input {p}; choose another --out")
    if out.is_dir():
        raise ValueError(f"output path {out} is a directory; give a .safetensors file name")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output file {out} already exists; pass --overwrite "
                              f"(overwrite=True) to replace it")


def save_atomically(tensors: dict, out_path, metadata: dict, overwrite: bool) -> None:
    """Write a temporary file beside ``out_path``, fsync it, and rename it into place: without
    ``overwrite`` a rename that never replaces (a file that appeared meanwhile is kept and the
    error says so), with it ``os.replace``. Nothing half-written is ever left at ``out_path``."""
    from safetensors.torch import save_file

    from ..output.writer import rename_noreplace
    out = Path(out_path)
    tmp = out.parent / f".{out.name}.fastmerge-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                rename_noreplace(tmp, out)
            except FileExistsError:
                raise FileExistsError(f"output file {out} appeared while extracting; it was "
                                      f"left untouched (pass --overwrite to replace it)") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def extract_exp_avg_sq(optimizer_state: Union[str, os.PathLike, dict], model,
                       out_path: Optional[Union[str, os.PathLike]] = None,
                       shapes: Optional[dict] = None, suffix: str = "",
                       overwrite: bool = False) -> dict:
    """Map each parameter's ``exp_avg_sq`` to its name; write safetensors if ``out_path``.

    Args:
        optimizer_state: an optimizer state_dict or the path of one (loaded weights_only).
        model: nn.Module, names in optimizer order, a names file or a HF model directory.
        shapes: optional {name: shape} to check against (e.g. the weights' safetensors header).
        suffix: appended to each name (e.g. ".exp_avg_sq"); the engine accepts both.
        overwrite: replace an existing ``out_path`` (otherwise an error before any work).
    Returns:
        {name + suffix: float32 tensor}.
    """
    if out_path is not None:
        check_output_file(out_path, overwrite, (optimizer_state, model))
    sd = optimizer_state if isinstance(optimizer_state, dict) else \
        load_optimizer_state(optimizer_state)
    names = parameter_names(model)
    order = [i for g in sd["param_groups"] for i in g["params"]]
    if len(order) != len(names):
        raise ValueError(f"the optimizer has {len(order)} parameters but the model lists "
                         f"{len(names)} trainable ones; they must be the same, in order")
    out = {}
    for name, idx in zip(names, order):
        state = sd["state"].get(idx, sd["state"].get(str(idx)))
        if state is None or "exp_avg_sq" not in state:
            raise ValueError(f"parameter {name!r} (optimizer index {idx}) has no exp_avg_sq: "
                             f"is this an Adam-family optimizer that has taken a step?")
        v = state["exp_avg_sq"].detach().to(torch.float32).contiguous()
        if shapes is not None and name in shapes and tuple(shapes[name]) != tuple(v.shape):
            raise ValueError(f"parameter {name!r}: exp_avg_sq has shape {tuple(v.shape)} but the "
                             f"weight has {tuple(shapes[name])}")
        if not finite_non_negative(v):
            raise ValueError(f"parameter {name!r}: exp_avg_sq has NaN/Inf or negative values")
        out[name + suffix] = v
    if out_path is not None:
        save_atomically(out, out_path, {"format": "pt", "fastmerge": json.dumps(
            {"kind": "exp_avg_sq", "parameters": len(out)})}, overwrite)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(
        prog="fastmerge extract-second-moments",
        description="Write an optimizer checkpoint's exp_avg_sq as safetensors named like the "
                    "weights (loaded with torch.load(weights_only=True)).")
    p.add_argument("optimizer", help="optimizer checkpoint, e.g. checkpoint-500/optimizer.pt")
    p.add_argument("--model", required=True,
                   help="model directory (config.json) or a text file of parameter names in "
                        "optimizer order")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--suffix", default="", help="append to each name, e.g. .exp_avg_sq")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    print(f"loading {args.optimizer} with torch.load(weights_only=True)")
    try:
        out = extract_exp_avg_sq(args.optimizer, args.model, args.out, suffix=args.suffix,
                                 overwrite=args.overwrite)
    except (ValueError, OSError) as exc:
        print(f"fastmerge: error: {exc}")
        return 1
    print(f"wrote {len(out)} exp_avg_sq tensors to {args.out}")
    return 0
