"""della and della_linear on the fused C++ kernel (csrc/cpu/della.cpp) through fastmerge._core,
over Python buffers and without torch: the checkpoint pipeline (pipeline/della_pass.py) and
``merge_tensors`` (api.py) run them here; fastmerge/methods/della.py stays the reference.

A tensor takes a reduce pass over its chunks (the per-model L1 sums of the rescale, and the keep
masks as 1 bit per element and model, so the apply pass does not rank again), then the apply
pass per chunk. Chunks are whole rows. Same masks as the reference; the float32 values are the
reference's operations in its order (sums over models in model order)."""
from __future__ import annotations

import math

from ... import abi
from ...methods import rng
from ...methods.della import Della, row_length
from . import core

# safetensors dtype -> the kernels' raw-pointer dtype code
DTYPE_CODES = {"F32": abi.DTYPE_FLOAT32, "F16": abi.DTYPE_FLOAT16, "BF16": abi.DTYPE_BFLOAT16}


def nonfinite_error(name: str, which: str, count: int) -> ValueError:
    return ValueError(f"tensor {name!r}: {which} contains {count} NaN/Inf value(s); fastmerge "
                      f"refuses to merge them")


class DellaKernel:
    """One tensor of della / della_linear: ``reduce(chunks)``, then ``apply`` per chunk. A chunk
    is (base buffer, its dtype code, model buffers, their dtype codes, offset, numel)."""

    def __init__(self, lib, method: Della, job, nthreads: int, keep_masks: bool = True):
        p = job.params
        self.lib, self.job, self.elect, self.nthreads = lib, job, method.elect, nthreads
        self.n = len(p["weight"])
        self.row_len = row_length(job.shape)
        self.rows = math.prod(job.shape) // self.row_len
        self.keys = [rng.dare_key(job.seed, job.name, i) for i in range(self.n)]
        self.density = [float(d) for d in p["density"]]
        self.epsilon = [float(e) for e in p["epsilon"]]
        self.scale = [1.0] * self.n
        self.keep_masks = keep_masks
        self.mask = None

    def _check(self, bad) -> None:
        for i in [*range(self.n), self.n]:   # the models first, as the reference checks them
            if bad[i]:
                which = f"model {i}" if i < self.n else "the base model"
                raise nonfinite_error(self.job.name, which, int(bad[i]))

    def _call(self, ch, l1, out=None, out_code=0):
        base, base_code, models, codes, offset, numel = ch
        p = self.job.params
        return self.lib.della(
            base, base_code, models, codes, self.row_len, offset, numel, self.density,
            self.epsilon, self.keys, l1, self.mask, self.rows, [float(w) for w in p["weight"]],
            self.scale, float(p["lambda"]), self.elect, bool(p["normalize"]), out, out_code,
            self.nthreads)

    @property
    def mask_bytes(self) -> int:
        """What keeping the keep masks between the passes costs (1 bit per element and model,
        rows padded to 64 bits)."""
        return 8 * self.n * self.rows * ((self.row_len + 63) // 64)

    def reduce(self, chunks) -> None:
        """The L1 rescale factors (the reference's ``reduce``), and the keep masks."""
        if not self.job.params["rescale"] or not any(0 < d < 1 for d in self.density):
            return
        if self.keep_masks:
            self.mask = bytearray(self.mask_bytes)
        l1 = [0.0] * (2 * self.n)
        for ch in chunks:
            l1, bad, _ = self._call(ch, l1)
            self._check(bad)
        self.scale = [1.0 if d >= 1 or l1[2 * i + 1] <= 0 else l1[2 * i] / l1[2 * i + 1]
                      for i, d in enumerate(self.density)]

    def apply(self, ch, out, out_code: int) -> tuple:
        """The merged chunk into ``out`` (a writable buffer of the chunk in ``out_code``);
        returns (count, first index or -1) of the NaN/Inf values the kernel stored."""
        _, bad, stored = self._call(ch, [0.0] * (2 * self.n), out, out_code)
        self._check(bad)
        return stored


def kernel_for(method, job, nthreads: int):
    """A DellaKernel for ``job`` where the kernel takes it, else None (the reference runs)."""
    if not isinstance(method, Della) or not job.has_base or job.n_models < 1 or \
            math.prod(job.shape) == 0:
        return None
    lib = core()
    if lib is None or not hasattr(lib, "della"):
        return None
    return DellaKernel(lib, method, job, nthreads)


# --------------------------------------------------------------------------- torch tensors
def torch_codes():
    import torch
    return {torch.float32: abi.DTYPE_FLOAT32, torch.float16: abi.DTYPE_FLOAT16,
            torch.bfloat16: abi.DTYPE_BFLOAT16}


def torch_buffer(t):
    """A CPU, contiguous, flat tensor's bytes as a buffer (numpy view of the same memory)."""
    import torch
    return t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy()


def merge_in_memory(method, job, base, models, out_dtype, nthreads: int):
    """``merge_tensors``' della on whole in-memory tensors (one chunk), or None where the
    kernel does not take them."""
    import torch
    codes = torch_codes()
    k = kernel_for(method, job, nthreads)
    if k is None or out_dtype not in codes or any(t.dtype not in codes for t in [base, *models]):
        return None
    numel = base.numel()
    ch = (torch_buffer(base), codes[base.dtype], [torch_buffer(m) for m in models],
          [codes[m.dtype] for m in models], 0, numel)
    k.reduce([ch])
    out = torch.empty(numel, dtype=out_dtype)
    k.apply(ch, out.view(torch.uint8).numpy(), codes[out_dtype])
    return out.reshape(base.shape)
