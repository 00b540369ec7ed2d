"""One description of the machine a benchmark ran on, shared by every benchmark script."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> str:
    """CPU model, cores, RAM, GPUs (if any), OS, Python and torch versions."""
    import torch
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return (f"{cpu_model()}, {os.cpu_count()} logical cores, {mem:.0f} GiB RAM{gpu}; "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")
