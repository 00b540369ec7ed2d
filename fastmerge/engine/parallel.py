"""The three seams a multi-process merge (torch.distributed, issue 9) plugs into. In one
process they are trivial; the engine only ever calls them, so ranks can be added here.

- ``assign_tensors``: which tensors this rank merges (whole tensors, balanced by bytes;
  row ranges of one giant tensor can be split the same way since merges take an offset).
- ``allreduce_histograms`` / ``allreduce_sum``: sum per-rank histograms and statistics
  (scope="model" thresholds, LiNeS alpha="auto").
- ``is_index_writer``: rank 0 writes the index, config, tokenizer and model card; every rank
  writes its tensors into the shared, pre-laid-out shard files (``ShardWriter.write`` uses
  pwrite at offsets fixed by ``ShardLayout``).
"""
from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """(rank, world_size): from torch.distributed when initialised, else (0, 1)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return 0, 1


def assign_tensors(names: list, sizes: dict, rank: int, world_size: int) -> list:
    """Greedy longest-first partition by bytes; every rank computes the same answer."""
    if world_size == 1:
        return list(names)
    loads = [0] * world_size
    owner = {}
    for name in sorted(names, key=lambda n: (-sizes[n], n)):
        r = loads.index(min(loads))
        owner[name] = r
        loads[r] += sizes[name]
    return [n for n in names if owner[n] == rank]


def allreduce_histograms(hist):
    """Sum a selection.Histograms over ranks (in place)."""
    if world()[1] > 1:
        import torch.distributed as dist
        dist.all_reduce(hist.counts)
        dist.all_reduce(hist.sums)
    return hist


def allreduce_sum(values: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        import torch.distributed as dist
        dist.all_reduce(values)
    return values


def is_index_writer(rank: int) -> bool:
    return rank == 0
