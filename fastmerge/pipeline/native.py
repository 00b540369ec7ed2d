"""``fastmerge merge``'s choice of kernels: the pipeline (driver.py) on CoreKernels, without
importing torch, where ``why_not`` allows, else on a torch backend (as merge_checkpoints).

Importing torch takes ~1 s on the 2-core machine of benchmarks/results/engine.md: the whole
0.2B task_arithmetic command took 1.2 s, the merge itself ~0.2 s of it. CoreKernels runs the
same C++ kernels as backend "cpu" over the mapped bytes, so the output is byte for byte the
same (tests/test_golden_outputs.py, tests/test_native.py). What _core does not bind (the
radix selection after a top-k window miss or over a chunked tensor, ``scope: model``, LiNeS
``alpha: auto``) it delegates per step to backend "cpu", importing torch then; nothing
restarts.
"""
from __future__ import annotations

import os
import time
from typing import Optional

from ..output.report import MergeResult
from ..recipe.config import MergeConfig, load_config
from .core_kernels import CoreKernels, core
from .driver import merge as run_pipeline
from .launch_env import env_world

_core = core   # tests ask whether fastmerge._core is built


def why_not(cfg: MergeConfig, device: str = "cpu", backend: str = "auto") -> Optional[str]:
    """None if ``cfg`` can merge on CoreKernels (without torch), else the reason it cannot."""
    info = cfg.info
    if os.environ.get("FASTMERGE_NATIVE", "1") == "0":
        return "FASTMERGE_NATIVE=0"
    if str(device) != "cpu" or backend not in ("auto", "cpu"):
        return f"device {device} / backend {backend}"
    if env_world()[1] > 1:
        return "several processes (torchrun)"
    if info.needs_second_moments:
        return f"merge_method {cfg.method} reads second moments"
    if core() is None:
        return "fastmerge._core is not built"
    return None


def merge_natively(cfg: MergeConfig, out_dir, *, t0: Optional[float] = None,
                   **kwargs) -> MergeResult:
    """The pipeline on CoreKernels for a config ``why_not`` accepts (``merge_checkpoints``'
    arguments, same output and errors)."""
    return run_pipeline(cfg, out_dir, CoreKernels, t0=t0, **kwargs)


def kernels_for(cfg: MergeConfig, device: str = "cpu", backend: str = "auto"):
    """(a factory of the pipeline's kernels, processes on this node) for ``cfg``:
    CoreKernels where ``why_not`` allows, else a torch backend."""
    if why_not(cfg, device, backend) is None:
        return CoreKernels, 1
    from . import parallel
    from .torch_entry import torch_kernels
    return torch_kernels(device, backend), parallel.local_world_size()


def merge(config, out_dir, *, device: str = "cpu", backend: str = "auto", **kwargs):
    """The CLI's merge: the pipeline on the kernels ``kernels_for`` picks."""
    t0 = time.perf_counter()
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    make, local = kernels_for(cfg, device, backend)
    return run_pipeline(cfg, out_dir, make, t0=t0, local_world_size=local, **kwargs)


def dry_run(config, out_dir, *, device: str = "cpu", backend: str = "auto", quiet=True,
            allow_nonfinite=False, **kwargs) -> str:
    """``merge``'s plan as text, on the same kernels, without reading a weight."""
    from .dry_run import dry_run as plan
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    make, local = kernels_for(cfg, device, backend)
    return plan(cfg, out_dir, make, local_world_size=local, **kwargs)
