"""Step boundaries for the two benchmark workers: CUDA events on a GPU (the host never waits, except once
after the first step), host clock readings on the CPU (for trying the harness on a machine without one)."""

from __future__ import annotations

import statistics
import time

import torch


class StepClock:
    def __init__(self, started: float) -> None:
        self.started, self.marks, self.first_step_s = started, [], None
        self.cuda = torch.cuda.is_available()

    def mark(self) -> None:
        """Call at the end of every step."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        if len(self.marks) == 1:
            if self.cuda:
                torch.cuda.synchronize()
            self.first_step_s = time.perf_counter() - self.started

    def result(self, warmup: int, images_per_step: int) -> dict:
        """Median and mean step time over the steps after ``warmup``, the time to first step, peak memory."""
        if self.cuda:
            torch.cuda.synchronize()
            ms = [self.marks[i - 1].elapsed_time(self.marks[i]) for i in range(warmup, len(self.marks))]
        else:
            ms = [1000 * (self.marks[i] - self.marks[i - 1]) for i in range(warmup, len(self.marks))]
        return {"steps_timed": len(ms), "ms_per_step": statistics.median(ms), "ms_per_step_mean": statistics.fmean(ms),
                "images_per_step": images_per_step, "time_to_first_step_s": self.first_step_s,
                "peak_allocated": torch.cuda.max_memory_allocated() if self.cuda else None,
                "peak_reserved": torch.cuda.max_memory_reserved() if self.cuda else None}
