"""della / della_linear tensors of the checkpoint pipeline on the fused C++ kernel
(csrc/cpu/della.cpp via backends/cpu/della.py): the reduce pass over the chunks (L1 sums and the
keep-mask bits), then the apply pass per chunk into an output buffer of the output dtype, on
CoreKernels' mapped bytes without torch and on TorchKernels' tensors (copied to the CPU).
What the kernel does not take (other dtypes, no base) runs the float32 reference."""
from __future__ import annotations

from ..backends.cpu.della import DTYPE_CODES, kernel_for
from .stored_output import StoreChecked


class _Unsupported(Exception):
    """A chunk the kernel cannot read (raised before anything is written)."""


def _bytes_chunk(ch):
    sts = [ch.base_st, *ch.model_sts]
    if ch.base is None or any(s not in DTYPE_CODES for s in sts):
        raise _Unsupported
    return (ch.base, DTYPE_CODES[ch.base_st], list(ch.models),
            [DTYPE_CODES[s] for s in ch.model_sts], ch.offset, ch.numel)


def _torch_chunk(ch):
    from ..backends.cpu.della import torch_buffer, torch_codes
    codes = torch_codes()
    if ch.base is None or any(t.dtype not in codes for t in [ch.base, *ch.models]):
        raise _Unsupported
    return (torch_buffer(ch.base), codes[ch.base.dtype], [torch_buffer(m) for m in ch.models],
            [codes[m.dtype] for m in ch.models], ch.offset, ch.base.numel())


class DellaPoint:
    """One della tensor of one merge on the kernel: ``reduce`` over the chunks, then ``apply``
    per chunk (pipeline/method_pass.py drives them, a sweep's points sharing each read)."""

    def __init__(self, passes, kern, name, st):
        self.passes, self.kern, self.name, self.st = passes, kern, name, st
        self.as_bytes = hasattr(passes.k, "to_torch")   # CoreKernels: chunks are bytes views
        self.convert = _bytes_chunk if self.as_bytes else _torch_chunk

    def reduce(self, chunks) -> None:
        self.kern.reduce(self._convert(ch) for ch in chunks)

    def _convert(self, ch):
        try:
            return self.convert(ch)
        except _Unsupported:   # point() checked the dtypes: a loader that changed them
            raise ValueError(f"tensor {self.name!r}: the della kernel cannot read its "
                             f"inputs' dtypes") from None

    def apply(self, ch, slot: int):
        """The merged chunk as the writer takes it (into the kernels' buffer of ``slot``)."""
        c = self._convert(ch)
        del ch
        out, buf = _output(self.passes.k if self.as_bytes else None, self.st, c[5], slot)
        stored = self.kern.apply(c, buf, DTYPE_CODES[self.st])
        return StoreChecked.of(out, stored) if self.as_bytes else out


def point(passes, method, name, job, base, models):
    """A DellaPoint for della tensor ``name``, or None where the kernel does not take it
    (another method, no base, a dtype it does not read) and the caller runs the reference."""
    st = passes.r.out_st[name]
    nthreads = getattr(passes.k, "nthreads", None)   # CoreKernels'; TorchKernels: torch's
    if nthreads is None:
        import torch
        nthreads = torch.get_num_threads()
    kern = kernel_for(method, job, nthreads)
    if kern is None or st not in DTYPE_CODES or base is None or \
            any(c.info(n).st not in DTYPE_CODES for c, n in [base, *models]):
        return None
    return DellaPoint(passes, kern, name, st)


def share_masks(points: list, chunking) -> None:
    """The masks kept between the passes count in the memory budget: while those of the
    points merged together fit in a quarter of what the chunks in flight may take, a point
    keeps its own; the others' apply passes rank again instead (slower, no memory)."""
    room = chunking.chunk_elems * chunking.bytes_per_elem // 4
    for p in points:
        p.kern.keep_masks = p.kern.mask_bytes <= room
        if p.kern.keep_masks:
            room -= p.kern.mask_bytes


def _output(kernels, st: str, numel: int, slot: int):
    """(the chunk's output as the writer takes it, the writable buffer the kernel fills):
    CoreKernels' buffer of the write slot, kept from tensor to tensor (its last write is done
    when the slot is handed out), or a CPU tensor of the output dtype."""
    if kernels is not None:
        view = kernels.out_buffer(slot, numel * (4 if st == "F32" else 2))
        return view, view
    import torch

    from ..checkpoint.safetensors_file import torch_dtypes
    out = torch.empty(numel, dtype=torch_dtypes()[st])
    return out, out.view(torch.uint8).numpy()
