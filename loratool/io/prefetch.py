"""Reading ahead: jobs loaded on background threads in order, bounded; reusable staging buffers.

:func:`prefetch` runs ``load(job)`` for the next jobs on worker threads while the caller works on
the current one, yields results in job order and never holds more than ``ahead`` results the
caller has not taken yet, so memory stays a few jobs' worth whatever the number of jobs. Reads of
a :class:`~loratool.io.sources.TensorSource` are positional and thread-safe, so several workers can
read several files (or shards) at once.

:class:`StagingRing` is a fixed set of byte buffers (page-locked for fast host→GPU copies) that a
reader fills and the consumer hands back; allocating and pinning a buffer per tensor is slow and
the pinned cache only grows.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

J = TypeVar("J")
R = TypeVar("R")
_END = object()


def prefetch(jobs: Iterable[J], load: Callable[[J], R], ahead: int = 2, workers: int = 1) -> Iterator[tuple[J, R]]:
    """``(job, load(job))`` in job order, up to ``ahead`` jobs loaded (or loading) beyond the one the
    caller holds, on ``workers`` threads.

    An exception in ``load`` is raised in the caller at that job; stopping early cancels the jobs
    not started (the running ones finish on their own: a load must not wait on the caller forever).
    """
    ahead = max(1, ahead, workers)
    todo = iter(jobs)
    pending: deque[tuple[J, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="loratool-prefetch")

    def submit() -> None:
        job = next(todo, _END)
        if job is not _END:
            pending.append((job, pool.submit(load, job)))

    try:
        for _ in range(ahead):
            submit()
        while pending:
            job, future = pending.popleft()
            result = future.result()
            submit()
            yield job, result
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


class StagingRing:
    """Up to ``slots`` byte buffers of ``slot_bytes`` each, handed out by :meth:`take` and returned by
    :meth:`give`; ``pinned`` page-locks them (CUDA builds only). A buffer is made when one is asked for and
    none is free (page-locking all at once would delay the first read); the process's buffer memory stays
    at most ``slots × slot_bytes``."""

    def __init__(self, slot_bytes: int, slots: int, *, pinned: bool = True):
        self.slot_bytes = slot_bytes
        self.pinned = pinned
        self._free: queue.Queue = queue.Queue()
        self._unmade = slots
        self._lock = threading.Lock()
        self.closed = False

    def _make(self) -> torch.Tensor | None:
        with self._lock:
            if self._unmade == 0:
                return None
            self._unmade -= 1
        import torch

        return torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=self.pinned)

    def take(self) -> torch.Tensor:
        """A free buffer, waiting for one to be given back; an error once the ring is closed."""
        buf = self.try_take()
        if buf is not None:
            return buf
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if self.closed:
                    raise RuntimeError("staging ring closed") from None

    def try_take(self) -> torch.Tensor | None:
        """A free buffer, or None at once when there is none (and all are made)."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return self._make()

    def give(self, buf: torch.Tensor) -> None:
        self._free.put(buf)

    def close(self) -> None:
        """Wake any reader waiting in :meth:`take` with an error (the consumer has stopped)."""
        self.closed = True
