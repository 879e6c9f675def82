"""Step boundaries for the two benchmark workers: CUDA events on a GPU (the host never waits, except once
after the first step), host clock readings on the CPU (for trying the harness on a machine without one).

With ``profile_to`` the steps from the second to the last warm-up step run under ``torch.profiler`` and a
summary is written there (bench/train/profile.py): the timed steps after the warm-up are not profiled."""

from __future__ import annotations

import statistics
import time

import torch


class StepClock:
    def __init__(self, started: float, profile_to: str | None = None, warmup: int = 0) -> None:
        self.started, self.marks, self.first_step_s = started, [], None
        self.cuda = torch.cuda.is_available()
        self.profile_to, self.warmup, self.profiler = profile_to, warmup, None
        if profile_to and warmup < 4:
            raise ValueError("profiling needs at least 4 warm-up steps (it profiles steps 2 to WARMUP)")

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
        if self.profile_to:
            self._profile()

    def _profile(self) -> None:
        from profile_steps import StepProfile

        if len(self.marks) == 1:
            self.profiler = StepProfile(self.cuda)
        elif self.profiler is not None and len(self.marks) == self.warmup:
            self.profiler.finish(self.warmup - 1, self.profile_to)
            self.profiler = None

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
