"""A safetensors file written while its tensors are still being made: data first, header last.

An extraction produces its factors batch after batch. Written at the end, an SDXL adapter's 400-500 MiB
cost a second after the last batch (checked, hashed and copied to the page cache one after the other).
:class:`SafetensorsStream` takes tensors as they come and a worker thread checks, hashes and writes each one
behind the work that makes the next, a run of tensors at a time. The data region holds the
tensors in the order they came; the header, known only at the end, goes into room reserved before the
data and is padded with spaces to fill it (the format allows trailing whitespace; every reader parses
the header as JSON).

:meth:`SafetensorsStream.finish` takes the tensors the file must hold. What was streamed must be them (the
same names, dtypes, shapes and values); any not streamed yet are appended. When that fails (a name
differs, the header outgrew its room, a tensor would sit misaligned) the file is rewritten from the
start by the reference writer (:func:`loratool.io.writer.write_file`): slower, never different in
what it holds. ``sshs_model_hash`` is the SHA-256 of the data region as written; ``sshs_legacy_hash``
is kohya's window of the reference serialisation, as :mod:`loratool.io.hashes` defines it.

Finiteness is judged from the bits on the worker with numpy (no torch arithmetic there: torch's thread
settings are the process's, and the compute runs beside it); a non-finite tensor is named on the next call.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from loratool.errors import LoraToolError
from loratool.io.writer import (
    HASH_KEY,
    WRITEBACK_BYTES,
    check_finite,
    check_metadata,
    dtype_name,
    header_bytes,
    tensor_bytes,
    write_file,
    writeback_starter,
)

if TYPE_CHECKING:
    import torch

STEP = 32 << 20  # bytes of a run judged finite at a time (the scratch buffer's size)
# exponent masks: a value is NaN or ±inf exactly when all its exponent bits are set, that is when its bits
# without the sign are at least the mask (the exponent lies just below the sign bit)
_NON_FINITE_BITS = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
                    "F64": (np.uint64, 0x7FF0000000000000), "C64": (np.uint32, 0x7F800000)}


def finite_bits(data: memoryview, dtype: str, scratch: np.ndarray | None = None) -> bool:
    """Whether the bytes of a ``dtype`` tensor (F16, BF16, F32, F64, C64) hold no NaN and no ±inf.
    Two passes, one call each: the bits without the sign into ``scratch`` (bytes, at least ``len(data)``;
    a fresh array without it), then their maximum. A reused scratch spares the page faults of a fresh
    temporary on every call (on a 485 MiB adapter: 0.07 s instead of 0.16-0.28 s here)."""
    kind, mask = _NON_FINITE_BITS[dtype]
    words = np.frombuffer(data, dtype=kind)
    if not len(words):
        return True
    out = None if scratch is None else scratch[:len(data)].view(kind)
    magnitude = np.bitwise_and(words, kind(np.iinfo(kind).max >> 1), out=out)
    return bool(magnitude.max() < kind(mask))


def header_room(entries: list[tuple[str, str, tuple[int, ...]]], total_bytes: int, metadata_bytes: int) -> int:
    """Bytes to reserve for a header that lists at most ``entries`` (name, dtype, shape; shapes at most
    these) of at most ``total_bytes`` of data, and metadata of at most ``metadata_bytes`` as JSON."""
    digits = len(str(max(1, total_bytes)))
    per = sum(len(name.encode()) + len(dtype) + len(str(list(shape))) + 2 * digits + 48
              for name, dtype, shape in entries)
    return -(-(per + metadata_bytes + 64) // 8) * 8


class SafetensorsStream:
    """Tensors appended to ``fh`` (an open, empty output file) as they are made; see the module docstring."""

    def __init__(self, fh: BinaryIO, room: int):
        self.fh = fh
        self.room = -(-room // 8) * 8  # the data starts 8-aligned
        self.entries: dict[str, tuple[str, tuple[int, ...], int]] = {}  # name -> (dtype, shape, nbytes), data order
        self.tensors: dict[str, torch.Tensor] = {}
        self.size = 0  # bytes of data so far
        self.busy_s = 0.0  # the worker's seconds (overlapped with the caller's work)
        self.parts = {"finite": 0.0, "hash": 0.0, "write": 0.0, "writeback": 0.0}  # busy_s by step
        self._scratch: np.ndarray | None = None  # the worker's buffer for judging finiteness (≤ STEP bytes)
        self._digest = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratool-write")
        self._jobs: list[Future] = []
        self._writeback = writeback_starter()
        self._started = self._pos = 8 + self.room  # the worker's file position, and where write-back is
        fh.seek(self._pos)

    # -- adding ------------------------------------------------------------------------------------

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Queue ``tensors`` to be written, in this order, after those before; a tensor that would sit
        misaligned here is kept for :meth:`finish`. Raises what an earlier write found (a non-finite
        tensor, a full disk). Tensors that lie one after another in one storage (a batch's factors, in
        memory order) are checked, hashed and written as one run: the worker takes the interpreter's lock
        a few times a run instead of several times a tensor, which the compute beside it needs."""
        self._raise_done()
        queued = []
        for name, t in tensors.items():
            if not isinstance(name, str) or name == "__metadata__":
                raise LoraToolError(f"{name!r} cannot name a tensor in a safetensors file")
            if name in self.entries:
                raise LoraToolError(f"two tensors are named {name!r}")
            dtype = dtype_name(t)
            if self.size % t.element_size():
                continue  # finish appends it, or rewrites the file
            if dtype not in _NON_FINITE_BITS:
                check_finite(name, t)  # fp8 and complex by torch, on this thread (anything else passes at once)
            n = t.numel() * t.element_size()
            self.entries[name] = (dtype, tuple(t.shape), n)
            self.tensors[name] = t
            self.size += n
            queued.append((name, t, dtype))
        if queued:
            self._jobs.append(self._pool.submit(self._write_all, queued))

    def _write_all(self, queued: list[tuple[str, torch.Tensor, str]]) -> None:
        """Check, hash and write ``queued`` (on the worker) with as few calls as possible: every call takes the
        interpreter's lock, which the compute threads beside it need (on an H100 host, a writer making ~10
        calls per 4 MiB waited ~1-2 s in all for the lock and slowed the compute by ~0.5 s). A run is judged
        finite a ``STEP`` at a time (bounded temporaries), then hashed and written whole (both release the lock)."""
        t0 = clock = time.perf_counter()
        parts = self.parts

        def lap(step: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            parts[step] += now - clock
            clock = now

        try:
            for run, data, dtype in _runs(queued):
                if dtype in _NON_FINITE_BITS:
                    if self._scratch is None:  # pages are touched only as far as runs reach
                        self._scratch = np.empty(STEP, dtype=np.uint8)
                    for lo in range(0, len(data), STEP):
                        if not finite_bits(data[lo:lo + STEP], dtype, self._scratch):
                            raise _NonFinite(next(name for name, t, _ in run
                                                  if not finite_bits(tensor_bytes(t), dtype)))
                lap("finite")
                self._digest.update(data)
                lap("hash")
                self.fh.write(data)
                lap("write")
                self._pos += len(data)
                pos = self._pos
                if self._writeback is not None and pos - self._started >= WRITEBACK_BYTES:
                    self.fh.flush()
                    self._writeback(self.fh.fileno(), self._started, pos - self._started)
                    self._started = pos
                    lap("writeback")
        finally:
            self.busy_s += time.perf_counter() - t0

    def _raise_done(self, wait: bool = False) -> None:
        """Raise the first error of a finished write (all of them with ``wait``)."""
        keep = []
        for job in self._jobs:
            if not (wait or job.done()):
                keep.append(job)
                continue
            try:
                job.result()
            except _NonFinite as e:
                self.close()
                check_finite(e.name, self.tensors[e.name])  # names NaN or inf, as every write does
                raise LoraToolError(f"tensor {e.name!r} holds non-finite values") from None  # pragma: no cover
            except BaseException:
                self.close()
                raise
        self._jobs = keep

    # -- finishing ---------------------------------------------------------------------------------

    def finish(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bool:
        """Make the file hold exactly ``tensors`` with ``metadata`` and its ``sshs_*`` hashes: append what was
        not streamed and write the header into its room; True when the streamed data stood, False when the
        file was rewritten by the reference writer."""
        from loratool.io.hashes import legacy_hash

        self._raise_done(wait=True)
        meta = {k: v for k, v in (check_metadata(metadata) or {}).items() if not k.startswith("sshs_")}
        if not self._holds_streamed(tensors):
            return self._rewrite(tensors, meta)
        rest = {k: tensors[k] for k in sorted(set(tensors) - set(self.entries),
                                              key=lambda k: (-tensors[k].element_size(), k))}
        self.add(rest)
        self._raise_done(wait=True)
        if len(self.entries) != len(tensors):  # one would sit misaligned
            return self._rewrite(tensors, meta)
        meta["sshs_legacy_hash"] = legacy_hash(tensors, meta)
        meta[HASH_KEY] = self._digest.hexdigest()
        head = header_bytes([(k, d, s, n) for k, (d, s, n) in self.entries.items()], meta, pad_to=self.room)
        if head is None:
            return self._rewrite(tensors, meta)
        self.close()
        self.fh.flush()
        self.fh.seek(0)
        self.fh.write(head)
        return True

    def _holds_streamed(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Every streamed tensor is one of ``tensors``: the same dtype and shape, and the same values (the
        same memory, or equal bits)."""
        import torch

        for name, (dtype, shape, _) in self.entries.items():
            t = tensors.get(name)
            if t is None or dtype_name(t) != dtype or tuple(t.shape) != shape:
                return False
            mine = self.tensors[name]
            same = (t.data_ptr() == mine.data_ptr() and t.stride() == mine.stride() and t.device == mine.device)
            if same:
                continue
            if t.dim() == 0 and not t.is_complex():  # an alpha, made again: its value and sign (NaN never matches)
                a, b = t.item(), mine.item()
                if a != b or (isinstance(a, float) and math.copysign(1.0, a) != math.copysign(1.0, b)):
                    return False
            elif not torch.equal(_bits(t), _bits(mine)):
                return False
        return True

    def _rewrite(self, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> bool:
        self.close()
        self.fh.flush()
        self.fh.seek(0)
        self.fh.truncate()
        write_file(self.fh, tensors, meta, hashes=True)
        return False

    def close(self) -> None:
        """Stop the worker (queued writes are dropped: the output is being abandoned or finished)."""
        for job in self._jobs:
            job.cancel()
        self._pool.shutdown(wait=True)


def _runs(queued: list[tuple[str, torch.Tensor, str]]):
    """``(tensors, bytes, dtype)`` for each run of ``queued`` whose tensors are contiguous, of one dtype and
    lie back to back in one CPU storage (one memoryview over them all); any other tensor is a run alone."""
    import torch

    i = 0
    while i < len(queued):
        name, t, dtype = queued[i]
        j = i + 1
        if _in_place(t):
            end = _byte_offset(t) + t.numel() * t.element_size()
            while j < len(queued):
                u = queued[j][1]
                if not (queued[j][2] == dtype and _in_place(u) and _same_storage(u, t) and _byte_offset(u) == end):
                    break
                end += u.numel() * u.element_size()
                j += 1
        if j - i == 1:
            yield queued[i:j], tensor_bytes(t), dtype
        else:
            whole = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
            yield queued[i:j], memoryview(whole[_byte_offset(t):end].numpy()), dtype
        i = j


def _in_place(t: torch.Tensor) -> bool:
    """Its bytes can be read where they lie: a dense, contiguous CPU tensor of plain values."""
    import torch

    return (t.layout == torch.strided and t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0 and not t.is_conj() and not t.is_neg()
            and not t.requires_grad)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _byte_offset(t: torch.Tensor) -> int:
    return t.storage_offset() * t.element_size()


def _bits(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


class _NonFinite(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name
