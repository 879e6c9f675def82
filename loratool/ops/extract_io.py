"""Reading weight pairs for extraction: positional reads into (pinned) buffers, and a prefetch thread.

Tensors are read with ``os.pread`` straight into a buffer instead of through a memory map, so the
pages of two multi-gigabyte checkpoints never count against the process (a touched memory map
stays resident until it is unmapped). Only the rows a module needs are read from a fused tensor.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.errors import LoraToolError
from loratool.io.safetensors import DTYPES, SafetensorsFile

COMPONENT_FILES = ("diffusion_pytorch_model", "model")


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` (all rows when ``stop`` is None) of one tensor of a source."""

    key: str
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class WeightRef:
    """How to rebuild one layer weight: row segments concatenated, optionally transposed, reshaped."""

    segments: tuple[Segment, ...]
    shape: tuple[int, ...]
    transpose: bool = False


class TensorFiles:
    """The tensors of one safetensors file, or of a diffusers folder (keys ``<component>.<name>``)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.files: dict[str, tuple[SafetensorsFile, str]] = {}
        p = Path(self.path)
        if p.is_dir():
            self._open_folder(p)
        else:
            sf = SafetensorsFile(p)
            self.files = {k: (sf, k) for k in sf.keys()}
        self._fds: dict[str, int] = {}

    def _open_folder(self, root: Path) -> None:
        for sub in sorted(q for q in root.iterdir() if q.is_dir()):
            for stem in COMPONENT_FILES:
                found = sorted(sub.glob(f"{stem}*.safetensors"))
                if found:
                    for f in found:
                        sf = SafetensorsFile(f)
                        self.files.update({f"{sub.name}.{k}": (sf, k) for k in sf.keys()})
                    break
        if not self.files:
            raise LoraToolError("a folder without <component>/*.safetensors weights (not a diffusers folder)",
                                self.path)

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        sf, name = self.files[key]
        return sf.info(name).shape

    def dtype(self, key: str) -> torch.dtype:
        sf, name = self.files[key]
        return DTYPES[sf.info(name).dtype][0]

    def where(self, key: str) -> str:
        return self.files[key][0].path

    def _segment(self, seg: Segment):
        sf, name = self.files[seg.key]
        info = sf.info(name)
        rows = info.shape[0] if info.shape else 1
        stop = rows if seg.stop is None else seg.stop
        row_bytes = info.nbytes // max(rows, 1)
        return sf, info, stop, row_bytes

    def nbytes(self, seg: Segment) -> int:
        _, _, stop, row_bytes = self._segment(seg)
        return (stop - seg.start) * row_bytes

    def read(self, seg: Segment, out: torch.Tensor | None = None) -> torch.Tensor:
        """The segment's rows as a tensor of the stored dtype, read into ``out`` (uint8) or a new buffer."""
        sf, info, stop, row_bytes = self._segment(seg)
        dtype = DTYPES[info.dtype][0]
        if dtype is None:
            raise LoraToolError(f"tensor {seg.key} has dtype {info.dtype}, which this torch cannot read", sf.path)
        n = (stop - seg.start) * row_bytes
        out = torch.empty(n, dtype=torch.uint8) if out is None else out[:n]
        self._pread(sf, sf.data_start + info.begin + seg.start * row_bytes, out)
        shape = ((stop - seg.start), *info.shape[1:]) if info.shape else ()
        return out.view(dtype).reshape(shape)

    def _pread(self, sf: SafetensorsFile, offset: int, out: torch.Tensor) -> None:
        fd = self._fds.get(sf.path)
        if fd is None:
            fd = self._fds[sf.path] = os.open(sf.path, os.O_RDONLY)
        view = memoryview(out.numpy()).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise LoraToolError(f"unexpected end of file at byte {offset + done}", sf.path)
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for sf in {id(sf): sf for sf, _ in self.files.values()}.values():
            sf.close()


ALIGN = 64


def weight_nbytes(src: TensorFiles, ref: WeightRef) -> int:
    """Bytes :func:`read_weight` needs in a staging buffer (segments aligned to 64 bytes)."""
    return sum(-(-src.nbytes(seg) // ALIGN) * ALIGN for seg in ref.segments)


def read_weight(src: TensorFiles, ref: WeightRef, out: torch.Tensor | None = None) -> torch.Tensor:
    """The layer weight described by ``ref``, in the stored dtype and the layer's shape.

    With ``out`` (a uint8 buffer of at least :func:`weight_nbytes` bytes) the segments are read into
    it back to back and the result is a view of it (unless segments must be joined or transposed).
    """
    parts, offset = [], 0
    for seg in ref.segments:
        parts.append(src.read(seg, None if out is None else out[offset:]))
        offset += -(-src.nbytes(seg) // ALIGN) * ALIGN
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if ref.transpose:
        t = t.transpose(0, 1).contiguous()
    return t.reshape(ref.shape)


class PinnedRing:
    """A fixed set of page-locked staging buffers, handed out and returned.

    Allocating pinned memory per tensor is slow (page locking) and its cache only grows, so the
    reader fills these few slots instead; the process's memory stays ``slots × slot_bytes``.
    """

    def __init__(self, slot_bytes: int, slots: int):
        self.slot_bytes = slot_bytes
        self._free: queue.Queue = queue.Queue()
        for _ in range(slots):
            self._free.put(torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True))

        self.closed = False

    def take(self) -> torch.Tensor:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if self.closed:
                    raise RuntimeError("staging ring closed") from None

    def give(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def prefetch(jobs: Sequence, load: Callable[[object], object], depth: int = 2) -> Iterator[tuple[object, object]]:
    """``(job, load(job))`` in order, loading up to ``depth`` jobs ahead on a background thread.

    An exception in ``load`` is re-raised in the consumer; stopping early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for job in jobs:
                if stop.is_set():
                    return
                q.put((job, load(job)))
        except BaseException as e:  # handed to the consumer
            q.put((done, e))
            return
        q.put((done, None))

    thread = threading.Thread(target=worker, name="loratool-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            job, item = q.get()
            if job is done:
                if item is not None:
                    raise item
                return
            yield job, item
    finally:
        stop.set()
        for _ in range(200):  # the worker may be blocked on a full queue: drain it (a daemon, so bounded)
            if not thread.is_alive():
                break
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
