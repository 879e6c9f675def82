"""The read-ahead helper: results in job order, a bounded number of jobs ahead, errors where they
happen, and no work left running once the caller stops."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loratool.io.prefetch import StagingRing, prefetch


class Tracker:
    """A load that records how many results exist that the caller has not taken yet."""

    def __init__(self, delay: float = 0.0):
        self.lock = threading.Lock()
        self.loaded = 0
        self.taken = 0
        self.most_ahead = 0
        self.started: list[int] = []
        self.delay = delay

    def load(self, job: int) -> int:
        with self.lock:
            self.started.append(job)
        time.sleep(self.delay)
        with self.lock:
            self.loaded += 1
            self.most_ahead = max(self.most_ahead, self.loaded - self.taken)
        return job * job


@pytest.mark.parametrize("workers", [1, 3])
def test_results_in_order_and_bounded(workers: int) -> None:
    t = Tracker(delay=0.002)
    out = []
    for job, result in prefetch(range(40), t.load, ahead=3, workers=workers):
        with t.lock:
            t.taken += 1
        time.sleep(0.003)  # a slow consumer: the loads run ahead as far as they may
        out.append((job, result))
    assert out == [(j, j * j) for j in range(40)]
    assert 2 <= t.most_ahead <= 3 + 1  # the ones waiting, plus the one just taken


def test_an_error_reaches_the_caller_at_its_job() -> None:
    def load(job: int) -> int:
        if job == 5:
            raise ValueError("bad job 5")
        return job

    seen = []
    with pytest.raises(ValueError, match="bad job 5"):
        for job, _ in prefetch(range(10), load, ahead=2):
            seen.append(job)
    assert seen == [0, 1, 2, 3, 4]


def test_stopping_early_starts_no_more_work() -> None:
    t = Tracker(delay=0.01)
    gen = prefetch(range(1000), t.load, ahead=2)
    for job, _ in gen:
        if job == 3:
            break
    gen.close()
    time.sleep(0.1)
    assert max(t.started) <= 3 + 2 + 1


def test_staging_ring_hands_out_and_back() -> None:
    ring = StagingRing(1024, 2, pinned=False)
    assert ring._free.qsize() == 0  # a buffer is made when first asked for (pinning all at once delays the first read)
    a, b = ring.take(), ring.take()
    assert ring.try_take() is None  # both made and out: no third
    assert a.numel() == 1024 and a.dtype == torch.uint8 and a.data_ptr() != b.data_ptr()
    ring.give(a)
    assert ring.take().data_ptr() == a.data_ptr()
    ring.close()
    with pytest.raises(RuntimeError, match="closed"):
        ring.take()
