"""della / della_linear tensors of the checkpoint pipeline on the fused C++ kernel
(csrc/cpu/della.cpp via backends/cpu/della.py): the reduce pass over the chunks (L1 sums and the
keep-mask bits), then the apply pass per chunk into an output buffer of the output dtype, on
CoreKernels' mapped bytes without torch and on TorchKernels' tensors (copied to the CPU).
What the kernel does not take (other dtypes, no base) runs the float32 reference."""
from __future__ import annotations

from ..backends.cpu.della import DTYPE_CODES, kernel_for


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


def merge(passes, method, name, job, src, writer, writes) -> bool:
    """Merge della tensor ``name`` on the kernel; False (nothing done) where it does not take
    it, and the caller runs the reference."""
    st = passes.r.out_st[name]
    nthreads = getattr(passes.k, "nthreads", None)   # CoreKernels'; TorchKernels: torch's
    if nthreads is None:
        import torch
        nthreads = torch.get_num_threads()
    kern = kernel_for(method, job, nthreads)
    if kern is None or st not in DTYPE_CODES:
        return False
    # the masks kept between the passes count in the memory budget: beyond a quarter of what
    # the chunks in flight may take, the apply pass ranks again instead (slower, no memory)
    chunking = passes.r.chunking
    kern.keep_masks = kern.mask_bytes <= chunking.chunk_elems * chunking.bytes_per_elem // 4
    as_bytes = hasattr(passes.k, "to_torch")   # CoreKernels: chunks are bytes views
    convert = _bytes_chunk if as_bytes else _torch_chunk
    written = False
    buffers: dict = {}
    try:
        kern.reduce(convert(ch) for ch in src())
        for ch in src():
            c = convert(ch)
            del ch
            offset, numel = c[4], c[5]
            slot = writes.slot()
            out, buf = _output(as_bytes, st, numel, buffers, slot)
            kern.apply(c, buf, DTYPE_CODES[st])
            del c
            written = True
            writes.submit(slot, passes.write_checked, writer, name, offset, offset + numel, st,
                          out)
            del out, buf
    except _Unsupported:
        if written:
            raise
        return False
    return True


def _output(as_bytes: bool, st: str, numel: int, buffers: dict, slot: int):
    """(the chunk's output as the writer takes it, the writable buffer the kernel fills): a
    bytes buffer reused per write slot (its last write is done when the slot is handed out),
    or a CPU tensor of the output dtype."""
    if as_bytes:
        nbytes = numel * (4 if st == "F32" else 2)
        if slot not in buffers or len(buffers[slot]) < nbytes:
            buffers[slot] = None
            buffers[slot] = bytearray(nbytes)
        view = memoryview(buffers[slot])[:nbytes]
        return view, view
    import torch

    from ..checkpoint.safetensors_file import torch_dtypes
    out = torch.empty(numel, dtype=torch_dtypes()[st])
    return out, out.view(torch.uint8).numpy()
