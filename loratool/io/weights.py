"""A layer weight as row ranges of stored tensors, read into a caller's buffer.

A checkpoint does not always store a layer's weight as one tensor: SAI/BFL files fuse q, k and v
(and Flux's single-block MLP) into one tensor, some rows in another order, some transposed. A
:class:`WeightRef` says which rows of which stored tensors make up one weight; :func:`read_weight`
reads exactly those bytes (positional reads, nothing else of the tensor) back to back into one
buffer, so a fused 21504-row tensor costs only the rows a module needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratool.io.sources import TensorSource

if TYPE_CHECKING:
    import torch

ALIGN = 64  # every segment starts on this byte boundary of the buffer (any dtype can view it)


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


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def weight_nbytes(src: TensorSource, ref: WeightRef) -> int:
    """Bytes :func:`read_weight` needs in a staging buffer (segments aligned to 64 bytes)."""
    return sum(_aligned(src.nbytes(seg.key, seg.rows(src))) for seg in ref.segments)


def read_weight(src: TensorSource, ref: WeightRef, out: torch.Tensor | None = None) -> torch.Tensor:
    """The layer weight described by ``ref``, in the stored dtype and the layer's shape.

    With ``out`` (a uint8 buffer of at least :func:`weight_nbytes` bytes) the segments are read into
    it back to back and the result is a view of it (unless segments must be joined or transposed).
    """
    import torch

    parts, offset = [], 0
    for seg in ref.segments:
        parts.append(src.read(seg.key, seg.rows(src), None if out is None else out[offset:]))
        offset += _aligned(src.nbytes(seg.key, seg.rows(src)))
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if ref.transpose:
        t = t.transpose(0, 1).contiguous()
    return t.reshape(ref.shape)
