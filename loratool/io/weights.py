"""A layer weight as row ranges of stored tensors, read into a caller's buffer.

A checkpoint does not always store a layer's weight as one tensor: SAI/BFL files fuse q, k and v
(and Flux's single-block MLP) into one tensor, some rows in another order, some transposed. A
:class:`WeightRef` says which rows of which stored tensors make up one weight; :func:`read_weight`
reads exactly those bytes (positional reads, nothing else of the tensor) back to back into one
buffer, so a fused 21504-row tensor costs only the rows a module needs. :func:`as_matrices` views the
bytes of one or several such weights (an extraction's batch) as matrices without a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratool.io.sources import TensorSource

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` (all rows when ``stop`` is None) of one tensor of a source."""

    key: str
    start: int = 0
    stop: int | None = None

    def rows(self, src: TensorSource) -> tuple[int, int] | None:
        """The row range to read from ``src`` (None: the whole tensor)."""
        if self.start == 0 and self.stop is None:
            return None
        return self.start, src.shape(self.key)[0] if self.stop is None else self.stop


@dataclass(frozen=True)
class WeightRef:
    """How to rebuild one layer weight: row segments concatenated, optionally transposed, reshaped."""

    segments: tuple[Segment, ...]
    shape: tuple[int, ...]
    transpose: bool = False


def weight_nbytes(src: TensorSource, ref: WeightRef) -> int:
    """Stored bytes of the weight (its segments' rows, back to back)."""
    return sum(nbytes for *_, nbytes in weight_pieces(src, ref))


def weight_pieces(src: TensorSource, ref: WeightRef) -> list[tuple[Segment, tuple[int, int], int, int]]:
    """(segment, row range, byte offset, bytes) of each stored segment, the segments back to back (a row's
    bytes are a multiple of its element size, so every piece can be viewed as the dtype)."""
    out, offset = [], 0
    for seg in ref.segments:
        rows = seg.rows(src)
        if rows is None:
            shape = src.shape(seg.key)
            rows = (0, shape[0] if shape else 1)
        n = src.nbytes(seg.key, rows)
        out.append((seg, rows, offset, n))
        offset += n
    return out


def read_into(src: TensorSource, ref: WeightRef, out: torch.Tensor) -> None:
    """Read the weight's stored bytes into ``out`` (a contiguous CPU ``uint8`` tensor of at least
    :func:`weight_nbytes` bytes), segments back to back."""
    for seg, rows, offset, _ in weight_pieces(src, ref):
        src.read(seg.key, rows, out[offset:])


def as_matrices(buf: torch.Tensor, ref: WeightRef, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` weights laid out like ``ref``, their stored bytes one after the other in ``buf`` (``uint8``,
    any device), as matrices ``[count, rows, cols]`` (``rows`` the layer's first dim, ``cols`` the rest) of
    ``dtype``: a view, transposed where the checkpoint stores the weight so."""
    rows, cols = ref.shape[0], math.prod(ref.shape[1:])
    x = buf.view(dtype)
    if ref.transpose:  # a 2-d weight stored as its transpose
        return x.view(count, cols, rows).transpose(1, 2)
    return x.view(count, rows, cols)


def read_weight(src: TensorSource, ref: WeightRef, out: torch.Tensor | None = None) -> torch.Tensor:
    """The layer weight described by ``ref``, in the stored dtype and the layer's shape.

    With ``out`` (a uint8 buffer of at least :func:`weight_nbytes` bytes) the segments are read into it back
    to back and the result is a view of it (unless the weight is stored transposed: then a copy).
    """
    import torch

    n = weight_nbytes(src, ref)
    buf = torch.empty(n, dtype=torch.uint8) if out is None else out[:n]
    read_into(src, ref, buf)
    w = as_matrices(buf, ref, 1, src.dtype(ref.segments[0].key))[0]
    return (w.contiguous() if ref.transpose else w).reshape(ref.shape)

