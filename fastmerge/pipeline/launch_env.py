"""What torchrun's environment says of this process (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
LOCAL_RANK), read without torch: the CLI and the sweep ask it before they know whether they
need torch, and parallel.py initialises the process group from it."""
from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        return default


def env_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun set them, else (0, 1)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def env_rank() -> int:
    """This process's rank under torchrun, 0 without it (rank 0 speaks for the run)."""
    return env_world()[0]


def local_world_size() -> int:
    """The processes torchrun started on this node (they share its memory), at least 1."""
    return max(1, _int("LOCAL_WORLD_SIZE", 1))


def local_rank() -> int:
    return _int("LOCAL_RANK", 0)
