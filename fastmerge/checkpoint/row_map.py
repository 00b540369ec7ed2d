"""A source whose token-indexed tensors (embeddings, LM heads) are re-ordered to another
vocabulary: output row ``t`` of model ``m`` is read from an input row chosen by a per-model
index map (its own row, another input's row, the mean of several inputs' rows, zeros, or the
mean of its own mapped rows for padding), gathered when a chunk is read, so a merge streams
the re-ordered tensor like any other. Which row each entry names is decided by
pipeline/vocabulary.py (mergekit's rules); this module only gathers. Torch is imported when a
mapped tensor is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .safetensors_file import TensorInfo, element_buffer

# the special row sources (non-negative entries of ``RowMap.src`` are input indexes)
MEAN, ZERO, PAD = -1, -2, -3
BLOCK_ROWS_ELEMS = 1 << 20   # elements per block when a padding row's mean is computed


@dataclass
class RowMap:
    """Output rows of one model: ``src[t]`` (an input index or MEAN/ZERO/PAD) and ``row[t]``
    (the row in that input). ``perms[i][t]``: input i's own row of token t, or -1 (what MEAN
    averages over, in input order)."""
    src: object      # numpy int64 [rows]
    row: object      # numpy int64 [rows]
    perms: list      # numpy int64 [tokens] per input


class RowMappedSource:
    """``inner`` with the tensors in ``maps`` (name -> RowMap) re-ordered; ``peers`` are all
    inputs' (unwrapped) sources, the ones a RowMap's indexes name."""

    def __init__(self, inner, maps: dict, peers: list):
        self.inner, self.maps, self.peers = inner, maps, peers
        self._pad_rows: dict = {}

    def __getattr__(self, attr):        # dir, label, where, names ... of the wrapped source
        return getattr(self.inner, attr)

    def info(self, name: str):
        i = self.inner.info(name)
        if name not in self.maps:
            return i
        shape = (len(self.maps[name].src), *i.shape[1:])
        n = 1
        for d in shape:
            n *= d
        return TensorInfo(name, i.st, shape, 0, n * i.itemsize)

    def read(self, name, start=0, stop=None, out=None):
        if name not in self.maps:
            return self.inner.read(name, start, stop, out)
        info = self.info(name)
        stop = info.numel if stop is None else stop
        cols = info.numel // max(1, info.shape[0])
        dst = element_buffer(info, stop - start, out)
        dtype = dst.dtype
        if stop == start:
            return dst
        r0, r1 = start // cols, -(-stop // cols)
        if start % cols == 0 and stop % cols == 0:   # whole rows: gathered in place
            self._rows(name, r0, r1, cols, dtype, dst.view(r1 - r0, cols))
            return dst
        rows = self._rows(name, r0, r1, cols, dtype)
        dst.copy_(rows.reshape(-1)[start - r0 * cols:stop - r0 * cols])
        return dst

    def map(self, name, start=0, stop=None):
        if name not in self.maps:
            return self.inner.map(name, start, stop)
        return self.read(name, start, stop)

    def view(self, name, start=0, stop=None) -> memoryview:
        if name not in self.maps:
            return self.inner.view(name, start, stop)
        import torch
        t = self.read(name, start, stop)
        return memoryview(t.view(torch.uint8).numpy()).toreadonly()

    def close(self) -> None:
        self.inner.close()

    # --- gathering
    def _peer_rows(self, i: int, name: str, r0: int, r1: int, cols: int):
        return self.peers[i].read(name, r0 * cols, r1 * cols).reshape(r1 - r0, cols)

    def _read_into(self, i: int, name: str, r0: int, r1: int, cols: int, dst) -> None:
        """Input i's rows [r0, r1) into ``dst`` (read straight into it when the dtypes agree,
        so a gathered chunk is its only copy)."""
        if self.peers[i].info(name).st == self.inner.info(name).st and dst.is_contiguous():
            import torch
            self.peers[i].read(name, r0 * cols, r1 * cols,
                               out=dst.reshape(-1).view(torch.uint8))
        else:
            dst.copy_(self._peer_rows(i, name, r0, r1, cols))

    def _rows(self, name: str, r0: int, r1: int, cols: int, dtype, out=None):
        """Output rows [r0, r1) of ``name`` as a [rows, cols] tensor of ``dtype`` (into
        ``out`` if given): runs of consecutive rows of one input are read as one range."""
        import torch
        m = self.maps[name]
        if out is None:
            out = torch.empty((r1 - r0, cols), dtype=dtype)
        t = r0
        while t < r1:
            s, r = int(m.src[t]), int(m.row[t])
            e = t + 1
            if s >= 0:
                while e < r1 and m.src[e] == s and m.row[e] == r + (e - t):
                    e += 1
                self._read_into(s, name, r, r + e - t, cols, out[t - r0:e - r0])
            elif s == MEAN:
                acc = torch.zeros(cols, dtype=torch.float32)
                count = 0
                for i, p in enumerate(m.perms):
                    if p[t] >= 0:
                        acc += self._peer_rows(i, name, int(p[t]), int(p[t]) + 1, cols)[0].float()
                        count += 1
                out[t - r0] = (acc / count).to(dtype)
            elif s == ZERO:
                out[t - r0] = 0
            else:
                out[t - r0] = self._pad_row(name, cols, dtype)
            t = e
        return out

    def _pad_row(self, name: str, cols: int, dtype):
        """mergekit's padding row: the mean of this model's own mapped token rows (computed
        once per tensor, streamed in blocks)."""
        if name not in self._pad_rows:
            import torch
            m = self.maps[name]
            tokens = len(m.perms[0])
            step = max(1, BLOCK_ROWS_ELEMS // max(1, cols))
            acc = torch.zeros(cols, dtype=torch.float64)
            for b in range(0, tokens, step):
                acc += self._rows(name, b, min(tokens, b + step), cols, dtype).double().sum(0)
            self._pad_rows[name] = (acc / max(1, tokens)).to(dtype)
        return self._pad_rows[name]


def is_mapped(source, name: Optional[str] = None) -> bool:
    return isinstance(source, RowMappedSource) and (name is None or name in source.maps)
