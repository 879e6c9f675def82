"""Streaming the weight pairs of an extraction to the compute device, batch by batch.

Batches hold same-shaped modules (in plan order of first appearance, a few tens of MiB each). Several
reader threads load batches at once (positional reads of only the rows a module needs: several
files, shards or parts of one file in parallel), in order, a bounded number ahead of the consumer.

A batch arrives stacked: one buffer a side, module after module, each module's stored rows back to back
(a batch's modules share their matrix shape, stored dtypes and orientation), seen as ``[n, rows, cols]``.
The consumer's work on it is then a few operations a batch, not a few a module: on a GPU host each
operation costs ~10–25 µs of host time whatever its size, and SDXL has over a thousand modules.

On CUDA a reader fills a small ring of pinned staging slots (``SLOT_BYTES`` each, whatever the model:
a weight larger than a slot — an LLM's embedding — goes through in row chunks) and issues each slot's
host→device copy itself, on a copy stream, as soon as the slot is full (one copy per run of bytes that
lie back to back in the slot and in the batch's buffer); a slot goes back to the readers when its copy
is done. The consumer gets each batch's weights on the device, in their stored dtype, with an event to
wait on, so reading, copying and the decomposition of earlier batches overlap; pinned memory stays
``slots × SLOT_BYTES``. The copy stream also compares each batch's two sides bit for bit after its copies
and sends which modules changed to pinned host memory before the event: the consumer learns that without
a wait for its own queue.

:class:`StageClock` collects where the time went (reading, copying, waiting, computing, writing).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from loratool.io.prefetch import StagingRing, prefetch
from loratool.io.sources import TensorSource
from loratool.io.weights import as_matrices, read_into, weight_nbytes, weight_pieces
from loratool.ops.extract_plan import PlannedModule

CPU_BATCH_BYTES = 64 << 20  # stored bytes of a batch's base + tuned weights
CUDA_BATCH_BYTES = (128 << 20, 512 << 20)  # on a GPU: 1/40 of its memory, within these bounds
SLOT_BYTES = 64 << 20
ALIGN = 64  # each piece starts on this byte boundary of a slot (the two sides may differ in dtype)
RAMP = 3  # on a GPU the first batches are 1/8, 1/4 and 1/2 of the budget: the first decomposition starts sooner


def batch_budget(device: torch.device) -> int:
    """Stored bytes of a batch. On a GPU every batch costs a fixed ~10 ms of host time (kernel launches,
    cuSOLVER calls, one wait), whatever its size (H100 profile: SDXL's 127 batches of 128 MiB spent more
    on that than on arithmetic), so batches are as large as the card allows: 1/40 of its memory (about
    six batches and a ΔW are in flight on a small card, about ten on a large one: :func:`read_ahead`),
    at most 512 MiB."""
    if device.type != "cuda":
        return CPU_BATCH_BYTES
    total = torch.cuda.get_device_properties(device).total_memory
    low, high = CUDA_BATCH_BYTES
    return max(low, min(high, total // 40))


def read_ahead(device: torch.device, readers: int) -> int:
    """Batches read ahead of the consumer: one more than the readers; on a GPU with room to spare (what is
    in flight kept within 1/8 of its memory) up to twice the readers plus one, so that the reads run on
    while the warm-up holds the first batch back and the first batches, ramped small, go by (H100, two
    calls: SD3 0.11-0.14 s faster, SDXL unchanged; ~1.3 GiB more GPU memory)."""
    if device.type != "cuda":
        return readers + 1
    total = torch.cuda.get_device_properties(device).total_memory
    return max(readers + 1, min(2 * readers + 1, total // (8 * batch_budget(device))))


def reader_count(device: torch.device) -> int:
    """Reader threads: several on a GPU host (page-cache copies run at a few GB/s a thread), two on a
    CPU (whose cores do the math)."""
    cores = os.cpu_count() or 2
    return max(1, min(4, cores // 4)) if device.type == "cuda" else min(2, cores)


@dataclass
class StageClock:
    """Seconds per stage, summed over threads (``read``, ``copy``) or on the consumer (``wait``:
    for the next batch; ``compute``: decomposing), and bytes read; with ``spans=[]``, each interval too
    (the benchmarks' timeline: how far reading and computing overlap). Thread-safe."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    started: float = field(default_factory=time.perf_counter)
    spans: list[tuple[str, float, float]] | None = None  # a list: every (stage, start, end) since ``started``
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _copies: list = field(default_factory=list, repr=False)

    def add(self, stage: str, seconds: float, nbytes: int = 0) -> None:
        """``seconds`` of ``stage`` that ended now."""
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.bytes_read += nbytes
            if self.spans is not None:
                end = time.perf_counter() - self.started
                self.spans.append((stage, end - seconds, end))

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def copy_events(self, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        with self._lock:
            self._copies.append((start, end))

    def as_dict(self) -> dict[str, float]:
        """Stage seconds (``copy`` from the copy events, timed on the device) and ``wall_s``."""
        out = {f"{k}_s": round(v, 4) for k, v in sorted(self.seconds.items())}
        if self._copies:
            self._copies[-1][1].synchronize()
            out["copy_s"] = round(sum(a.elapsed_time(b) for a, b in self._copies) / 1000, 4)
        out["read_gib"] = round(self.bytes_read / 2**30, 3)
        out["wall_s"] = round(time.perf_counter() - self.started, 4)
        return out


@dataclass
class PairBatch:
    """Same-shaped modules and their stored weights on the device, stacked: ``base`` and ``tuned`` are
    ``[n, rows, cols]`` (each module's matrix, in the stored dtype; a view of one buffer a side)."""

    modules: list[PlannedModule]
    base: torch.Tensor
    tuned: torch.Tensor
    ready: torch.cuda.Event | None = None  # CUDA: the copies are done once this has fired
    changed: torch.Tensor | None = None  # CUDA: whether each module changed (pinned bool [n]), set by ``ready``

    def changed_modules(self) -> list[bool]:
        """Whether each module differs in any stored bit (:func:`changed_flags`): on CUDA as the reader's
        copy stream found it, so the host waits for that stream only, not for the compute queue."""
        if self.changed is None:
            return changed_flags(self.base, self.tuned)
        self.ready.synchronize()
        return self.changed.tolist()


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def changed_flags(base: torch.Tensor, tuned: torch.Tensor) -> list[bool]:
    """Whether each matrix of two stacks ``[n, rows, cols]`` differs in any stored bit (so ``-0.0`` vs
    ``0.0`` counts as a change, and a NaN left as it was does not); one wait for the device. On a CPU
    matrix by matrix, with no temporary (an LLM's embedding would need a flag a weight)."""
    if base.device.type == "cpu":
        return [not torch.equal(_bits(b), _bits(t)) for b, t in zip(base, tuned, strict=True)]
    return differs(base, tuned).tolist()


def differs(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """:func:`changed_flags` left on the device: a bool ``[n]``."""
    return (_bits(base) != _bits(tuned)).flatten(1).any(dim=1)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_BITS[x.element_size()])


def batches(modules: list[PlannedModule], budget: int, nbytes: Callable[[PlannedModule], int] | None = None,
            kind: Callable[[PlannedModule], tuple] | None = None, ramp: int = 0) -> list[list[PlannedModule]]:
    """Same-shaped, same-rank modules (and of the same ``kind(module)``, when given) grouped, in plan order
    of first appearance, each batch at most ``budget`` bytes by ``nbytes(module)`` (default: the fp32 ΔW),
    and at least one module. ``ramp``: the first batches get ``budget / 2**ramp``, then twice that, … up to
    ``budget`` (the consumer starts on a small batch while the readers fill the large ones)."""
    nbytes = nbytes or (lambda m: 4 * math.prod(m.matrix_shape))
    groups: dict[tuple, list[PlannedModule]] = {}
    for m in modules:
        extra = kind(m) if kind is not None else ()
        groups.setdefault((m.matrix_shape, m.rank, m.is_text_encoder, m.embedding, *extra), []).append(m)
    out = []
    for group in groups.values():
        size, i = max(1, nbytes(group[0])), 0
        while i < len(group):
            per = max(1, (budget >> max(0, ramp - len(out))) // size)
            out.append(group[i:i + per])
            i += per
    return out


def pair_batches(b: TensorSource, t: TensorSource, modules: list[PlannedModule], budget: int, ramp: int = 0
                 ) -> list[list[PlannedModule]]:
    """:func:`batches` as the reader forms them: by stored bytes, and stackable (one orientation, one stored
    dtype a side)."""
    def kind(m: PlannedModule) -> tuple:
        first = m.ref.segments[0].key
        return m.ref.transpose, b.dtype(first), t.dtype(first)

    return batches(modules, budget, lambda m: pair_nbytes(b, t, m), kind, ramp)


def pair_nbytes(b: TensorSource, t: TensorSource, m: PlannedModule) -> int:
    """Stored bytes of one module's base and tuned weights."""
    return weight_nbytes(b, m.ref) + weight_nbytes(t, m.ref)


def stacked(buf: torch.Tensor, batch: list[PlannedModule], src: TensorSource) -> torch.Tensor:
    """A batch's buffer of stored bytes (``uint8``, module after module) as its matrices ``[n, rows, cols]``
    in the stored dtype (a view: transposed where the checkpoint stores the weight so)."""
    ref = batch[0].ref
    return as_matrices(buf, ref, len(batch), src.dtype(ref.segments[0].key))


def read_stacked(src: TensorSource, batch: list[PlannedModule]) -> torch.Tensor:
    """A batch's stored weights read from ``src`` into one host buffer (positional reads of the rows each
    module needs), as :func:`stacked` matrices."""
    per = weight_nbytes(src, batch[0].ref)
    buf = torch.empty(len(batch) * per, dtype=torch.uint8)
    for i, m in enumerate(batch):
        read_into(src, m.ref, buf[i * per:])
    return stacked(buf, batch, src)


@contextmanager
def _short_switch_interval(seconds: float = 5e-4) -> Iterator[None]:
    """Reader threads wake from each read needing the GIL: a shorter switch interval lets them have it
    sooner while the consumer runs Python."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def stream_pairs(b: TensorSource, t: TensorSource, modules: list[PlannedModule], device: torch.device,
                 clock: StageClock | None = None, readers: int | None = None, flags: bool = True
                 ) -> Iterator[PairBatch]:
    """:class:`PairBatch` es in order, read ahead on ``readers`` threads (default :func:`reader_count`);
    ``flags=False``: on CUDA the copy stream only copies (``changed`` stays ``None``: the benchmarks' floor)."""
    clock = clock or StageClock()
    readers = readers or reader_count(device)
    jobs = pair_batches(b, t, modules, batch_budget(device), RAMP if device.type == "cuda" else 0)
    ahead = read_ahead(device, readers)
    with _short_switch_interval():
        if device.type != "cuda":
            def load_cpu(batch: list[PlannedModule]) -> PairBatch:
                t0 = time.perf_counter()
                out = PairBatch(batch, read_stacked(b, batch), read_stacked(t, batch))
                clock.add("read", time.perf_counter() - t0, sum(pair_nbytes(b, t, m) for m in batch))
                return out

            for _, loaded in _timed(prefetch(jobs, load_cpu, ahead=ahead, workers=readers), clock):
                yield loaded
            return
        uploader = Uploader(b, t, device, clock, slots=readers + 2, flags=flags)
        try:
            for _, loaded in _timed(prefetch(jobs, uploader.load, ahead=ahead, workers=readers), clock):
                yield loaded
        finally:
            uploader.close()


def _timed(items: Iterator, clock: StageClock) -> Iterator:
    """``items``, with the time the consumer waited for each counted as ``wait``."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        clock.add("wait", time.perf_counter() - t0)
        yield item


class Uploader:
    """Reads a batch into pinned slots and copies each slot to the device on a copy stream (see the
    module docstring); called on reader threads."""

    def __init__(self, b: TensorSource, t: TensorSource, device: torch.device, clock: StageClock, slots: int,
                 flags: bool = True):
        self.sources = (b, t)
        self.flags = flags
        self.device = device
        self.clock = clock
        self.ring = StagingRing(SLOT_BYTES, slots)
        self.stream = torch.cuda.Stream(device)
        self._in_flight: list[tuple[torch.cuda.Event, torch.Tensor]] = []
        self._lock = threading.Lock()

    def load(self, batch: list[PlannedModule]) -> PairBatch:
        """The batch on the device, with the event that says its copies are done and, read back by the same
        event, which of its modules changed (compared on the copy stream, after the copies)."""
        sides = self.sources
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            per = [weight_nbytes(src, batch[0].ref) for src in sides]
            dests = [torch.empty(len(batch) * n, dtype=torch.uint8, device=self.device) for n in per]
            pieces = [(src, seg, rows, dest, i * n + offset)
                      for src, dest, n in zip(sides, dests, per, strict=True) for i, m in enumerate(batch)
                      for seg, rows, offset, _ in weight_pieces(src, m.ref)]
            self._copy(pieces)
            base, tuned = stacked(dests[0], batch, sides[0]), stacked(dests[1], batch, sides[1])
            changed = None
            if self.flags:
                changed = torch.empty(len(batch), dtype=torch.bool, pin_memory=True)
                changed.copy_(differs(base, tuned), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return PairBatch(batch, base, tuned, ready, changed)

    def _copy(self, pieces: list) -> None:
        """Read every row range into slots (splitting ranges larger than a slot) and copy each full slot
        to its destinations, on the copy stream."""
        slot, used, staged = None, 0, []
        for src, seg, (start, stop), dest, at in pieces:
            row_bytes = src.nbytes(seg.key, (start, start + 1)) if stop > start else 0
            per_slot = max(1, SLOT_BYTES // max(1, row_bytes))
            row = start
            while row < stop:
                n = min(stop - row, per_slot)
                need = _aligned(n * row_bytes)
                if slot is None or used + need > SLOT_BYTES:
                    if slot is not None:
                        self._send(slot, staged)
                    slot, used, staged = self._take(), 0, []
                t0 = time.perf_counter()
                src.read(seg.key, (row, row + n), slot[used:])
                self.clock.add("read", time.perf_counter() - t0, n * row_bytes)
                _stage(staged, dest, at + (row - start) * row_bytes, used, n * row_bytes)
                used += need
                row += n
        if slot is not None:
            self._send(slot, staged)

    def _send(self, slot: torch.Tensor, staged: list) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        for dest, at, src_at, nbytes in staged:
            dest[at:at + nbytes].copy_(slot[src_at:src_at + nbytes], non_blocking=True)
        end.record(self.stream)
        self.clock.copy_events(start, end)
        with self._lock:
            self._in_flight.append((end, slot))

    def _take(self) -> torch.Tensor:
        """A free slot: one whose copy has finished, else wait for the oldest copy in flight."""
        while True:
            with self._lock:
                done = [x for x in self._in_flight if x[0].query()]
                self._in_flight = [x for x in self._in_flight if not any(x is d for d in done)]
                for _, slot in done:
                    self.ring.give(slot)
                oldest = self._in_flight[0][0] if self._in_flight else None
            slot = self.ring.try_take()
            if slot is not None:
                return slot
            if oldest is not None:
                oldest.synchronize()
            else:  # every slot is being filled by another reader
                return self.ring.take()

    def close(self) -> None:
        self.ring.close()


def _stage(staged: list, dest: torch.Tensor, at: int, src_at: int, nbytes: int) -> None:
    """Add a copy of ``nbytes`` from byte ``src_at`` of the slot to byte ``at`` of ``dest``, as part of the
    previous copy when both continue it (one host→device copy per run of back-to-back bytes)."""
    if staged:
        d, a, s, n = staged[-1]
        if d is dest and a + n == at and s + n == src_at:
            staged[-1] = (d, a, s, n + nbytes)
            return
    staged.append((dest, at, src_at, nbytes))


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
