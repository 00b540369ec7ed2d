"""``merge_checkpoints``: the checkpoint pipeline (pipeline.py) on a torch backend
(torch_kernels.TorchKernels), in one process or under torchrun (parallel.py)."""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import get_backend
from ..output.report import MergeResult
from ..recipe.config import ConfigError, MergeConfig
from . import parallel
from .driver import merge
from .torch_kernels import TorchKernels


def torch_kernels(device: str = "cpu", backend: str = "auto"):
    """A factory of the pipeline's kernels on ``backend`` and ``device``: checks the device,
    joins torchrun's process group (this rank's GPU), picks the backend."""
    def make():
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but torch sees no CUDA device")
        dev = parallel.init_from_env(device)     # torchrun: process group, this rank's GPU
        try:
            be = get_backend(backend, dev)
        except ValueError as exc:                # a backend this machine cannot run
            raise ConfigError(str(exc)) from None
        return TorchKernels(be, dev)
    return make


def merge_checkpoints(config, out_dir, *, device: str = "cpu", memory_budget=None,
                      shard_size="5GB", backend: str = "auto", seed: Optional[int] = None,
                      overwrite: bool = False, quiet: bool = True,
                      lines_pattern: Optional[str] = None,
                      max_chunk_elems: Optional[int] = None,
                      allow_nonfinite: bool = False) -> MergeResult:
    """Merge whole checkpoints as ``config`` says and write them to ``out_dir``.

    Args:
        config: a YAML file path, a YAML string, a mapping (mergekit-style, see
            fastmerge/recipe/config.py) or a MergeConfig.
        out_dir: the output directory; built beside it and renamed into place when complete.
        device: "cpu" or "cuda" (where the merge computes).
        memory_budget: bytes or a string like "8GiB": bound on what the merge allocates
            (beyond the interpreter's own baseline); tensors larger than the budget are
            merged in row chunks. Default min(8 GiB, half the RAM).
        shard_size: output shard size ("5GB").
        backend: "auto", "torch", "cpu", "cuda" or "triton".
        seed: DARE seed (overrides the config's).
        overwrite: replace an existing ``out_dir``.
        quiet: no progress bars.
        lines_pattern: a regex with the block index as its last group (LiNeS depth and
            mergekit gradients); overrides the config's ``lines.pattern``.
        max_chunk_elems: cap on the elements per chunk (below what the budget allows).
        allow_nonfinite: write merged tensors with NaN/Inf values (an overflow of the output
            dtype), with a NonFiniteOutputWarning naming them, instead of stopping with
            NonFiniteOutput before anything is written.
    Returns:
        A MergeResult (``.summary()`` is the line the CLI prints).
    """
    return merge(config, out_dir, torch_kernels(device, backend), memory_budget=memory_budget,
                 shard_size=shard_size, seed=seed, overwrite=overwrite, quiet=quiet,
                 lines_pattern=lines_pattern, max_chunk_elems=max_chunk_elems,
                 allow_nonfinite=allow_nonfinite, local_world_size=parallel.local_world_size())


def needs_moments(cfg: MergeConfig) -> bool:
    return cfg.info.needs_second_moments
