"""The pipeline's kernels over a torch backend (torch, cpu, cuda, triton: fastmerge/backends):
chunks are torch tensors on the merge's device (streaming.ChunkLoader: mapped on the CPU,
pinned staging + non-blocking copies on a GPU), the planner's selection and statistics run
through plan.BackendKernels, the fused pass through ``Backend.merge``; torchrun's collectives
come from parallel.py."""
from __future__ import annotations

from functools import partial

import torch

from ..backends.cpu import output_cache_limit
from ..checkpoint.safetensors_file import Checkpoint, CheckpointError, torch_dtypes
from ..methods.moments import finite_non_negative
from ..output.report import nonfinite_in
from ..planning.plan import BackendKernels, TensorPlan
from ..planning.selection import Chunk, release_scratch
from . import parallel
from .budget import selection_window_rows
from .streaming import ChunkLoader


class TorchKernels(BackendKernels):
    merge_pass_label = "merge"

    def __init__(self, backend, device="cpu", dist=parallel):
        super().__init__(backend)
        self.name = backend.name
        self.chunking_name = backend.name
        self.device = device
        self.dist = dist
        self.inputs = self.loader = None
        self.cache0 = output_cache_limit(backend, 0)   # configure sizes it to one output chunk

    def bind(self, inputs) -> None:
        self.inputs = inputs
        self.loader = ChunkLoader(inputs.base, inputs.models, inputs.preconditioners,
                                  self.device)

    def configure(self, chunking, out_chunk_bytes: int) -> None:
        output_cache_limit(self.be, out_chunk_bytes)
        self.window_rows = partial(selection_window_rows, chunk_elems=chunking.chunk_elems,
                                   threads=torch.get_num_threads(), work=chunking.work)

    def start(self) -> None:
        if str(self.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def peak_gpu(self):
        return torch.cuda.max_memory_allocated() if str(self.device).startswith("cuda") else None

    def close(self) -> None:
        release_scratch()
        output_cache_limit(self.be, 0)   # give the kept outputs back, then the usual limit
        output_cache_limit(self.be, self.cache0)

    # --- reading
    def load(self, name, start, stop, only_reference=False) -> Chunk:
        r = self.inputs
        with_moments = bool(r.preconditioners)
        chunk = self.loader.load(name, start, stop, only_reference=only_reference,
                                 with_moments=with_moments,
                                 moment_names=r.moment_names.get(name),
                                 route=r.routes[name] if r.routes is not None else None)
        for i, v in enumerate(chunk.second_moments):
            if not finite_non_negative(v):
                pre = r.preconditioners[i]
                where = pre.path_of(r.moment_names[name][i]) \
                    if isinstance(pre, Checkpoint) else pre.path
                raise CheckpointError(f"{where}, tensor {r.moment_names[name][i]!r}: "
                                      f"second moments must be finite and non-negative "
                                      f"(exp_avg_sq); found NaN/Inf or negative values")
        return chunk

    # --- the fused pass
    def tensor_plan(self, plan, device) -> TensorPlan:
        """``plan`` (a planner.RowPlan) as tensors on ``device``, made once."""
        key = ("torch", str(device))
        tp = plan.compiled.get(key)
        if tp is None:
            tp = plan.compiled[key] = TensorPlan.from_rows(plan).on(device)
        return tp

    def merge(self, chunk: Chunk, plan, out_st: str, slot: int):
        tp = self.tensor_plan(plan, chunk.models[0].device)
        out, nonfinite = self.be.merge(chunk, tp, torch_dtypes()[out_st])
        return out, nonfinite.tolist()

    def chunk_numel(self, chunk: Chunk) -> int:
        return (chunk.base if chunk.base is not None else chunk.models[0]).numel()

    def nonfinite_of(self, out, out_st: str):
        """report.nonfinite_in for an output chunk: over its bytes on the CPU, by torch on a
        GPU (where the bytes are not addressable)."""
        if out.device.type == "cpu":
            return nonfinite_in(out.reshape(-1).view(torch.uint8).numpy(), out_st)
        bad = ~torch.isfinite(out.reshape(-1))
        if not bool(bad.any()):
            return None
        return int(bad.sum()), int(bad.nonzero()[0, 0])

    def write(self, writer, name, offset, out) -> None:
        writer.write(name, offset, out)

    def write_copy(self, writer, name, offset, chunk: Chunk) -> None:
        writer.write(name, offset, chunk.base if chunk.base is not None else chunk.models[0])

    # --- LiNeS alpha="auto"
    def lines_sums(self, chunk: Chunk, plan) -> tuple[float, float]:
        """(||sum_i t_i||_1, ||merged - base||_1) of one chunk, the merge in float32."""
        tp = self.tensor_plan(plan, chunk.models[0].device)
        out, nonfinite = self.be.merge(chunk, tp, torch.float32)
        bad = nonfinite.nonzero().flatten().tolist()
        if bad:
            from ..planning.thresholds import nonfinite_error
            raise nonfinite_error(bad[0], int(nonfinite[bad[0]]), (plan.tensor_name,))
        b = chunk.base.to(torch.float32)
        merged = (out - b).abs().sum(dtype=torch.float64).cpu()
        tsum = torch.zeros_like(b)
        for m in chunk.models:
            tsum += m.to(torch.float32)
        tsum -= len(chunk.models) * b
        task = tsum.abs().sum(dtype=torch.float64).cpu()
        return float(task), float(merged)

    def reduce_floats(self, values: list) -> list:
        return self.dist.allreduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()
