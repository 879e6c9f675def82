"""Extract a LoRA from a base and a fine-tuned model: ΔW = W_tuned − W_base, truncated per module.

The pipeline streams (:mod:`loratool.ops.extract_stream`): the inputs are opened as tensor sources
(single files, diffusers, component or HF model folders, sharded or not), reader threads load
batches of same-shaped weight pairs (only the rows a module needs) and, on CUDA, copy them to the
device from pinned staging slots while earlier batches are decomposed
(:mod:`loratool.ops.extract_batch`); only the small factors come back. Peak memory is a few batches
plus the staging slots, not two models. Pure library code: progress goes to a callback, and where
the time went is in ``ExtractResult.profile``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from loratool.core.dtypes import DTYPES
from loratool.core.modules import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.io.prefetch import prefetch
from loratool.io.sources import TensorSource
from loratool.ops.extract_batch import extract_batch, lora_module
from loratool.ops.extract_deltas import add_deltas
from loratool.ops.extract_plan import ExtractOptions, Plan, build_plan, open_pair, plan_extract
from loratool.ops.extract_report import ModuleReport, compact, summarize
from loratool.ops.extract_startup import warming
from loratool.ops.extract_stream import PairBatch, StageClock, batches, stream_pairs

__all__ = ["ExtractResult", "batches", "extract", "open_pair", "output_dtype", "plan_extract", "stream_pairs"]

Progress = Callable[[int, int, str], None]  # (modules done, total, last module key)
Sink = Callable[[list[LoraModule]], None]  # takes each batch's modules as they are made (a file being streamed)


@dataclass
class ExtractResult:
    adapter: Adapter
    plan: Plan
    reports: list[ModuleReport]
    summary: dict
    dtype: torch.dtype
    profile: dict[str, float] = field(default_factory=dict)  # seconds per stage (StageClock.as_dict)

    def compact_report(self) -> str:
        return compact(self.reports, self.summary)

    def full_report(self) -> dict:
        return {"arch": self.plan.arch, "summary": self.summary, "modules": [r.as_dict() for r in self.reports],
                "profile": self.profile}

    @property
    def embedding_keys(self) -> list[str]:
        """Adapter keys of the input-embedding modules (peft writes them in its embedding layout)."""
        return [m.adapter_key for m in self.plan.modules if m.embedding and m.adapter_key in self.adapter.modules]


def extract(base: str | os.PathLike[str], tuned: str | os.PathLike[str], options: ExtractOptions,
            progress: Progress | None = None, *, plan: Plan | None = None,
            clock: StageClock | None = None, sink: Sink | None = None) -> ExtractResult:
    """Extract a LoRA of ``tuned − base``; ``plan`` (from :func:`plan_extract` on the same inputs and
    options) skips planning again; ``clock`` collects stage times (a fresh one by default); ``sink`` gets
    each batch's modules as soon as they are made, in the order the adapter holds them (the time it takes
    counts as ``sink``)."""
    clock = clock or StageClock()
    warm_start(options.device)  # beside planning; _run takes the same warm-up
    with open_pair(base, tuned) as (b, t):
        with clock.timed("plan"):
            plan = plan or build_plan(b, t, options)
        dtype = output_dtype(options.dtype, t, plan)
        reports, modules = _run(b, t, plan, options, dtype, progress, clock, sink)
        adapter = _adapter(plan)
        for m in modules:
            adapter.add(m)
        deltas = add_deltas(adapter, b, t, plan.arch, options.deltas) if options.deltas else []
    order = {m.key: i for i, m in enumerate(plan.modules)}
    reports.sort(key=lambda r: order[r.key])
    summary = summarize(reports, plan.excluded, plan.missing, plan.tied)
    if options.deltas:
        summary["deltas"] = deltas  # the bias and norm-weight changes carried whole beside the LoRA
    return ExtractResult(adapter, plan, reports, summary, dtype, clock.as_dict())


def output_dtype(name: str | None, tuned: TensorSource, plan: Plan) -> torch.dtype:
    if name is not None:
        if name not in DTYPES:
            raise LoraToolError(f"--dtype {name}: use fp16, bf16 or fp32")
        return DTYPES[name]
    stored = tuned.dtype(plan.modules[0].ref.segments[0].key)
    return stored if stored in DTYPES.values() else torch.float32


def outline(plan: Plan) -> Adapter:
    """The adapter an extraction by ``plan`` makes at most: every planned module at its rank cap, as
    float32 tensors on the meta device (no memory): what a file streamed as it is made reserves room for."""
    adapter = _adapter(plan)
    for m in plan.modules:
        rows, cols = m.matrix_shape
        adapter.add(lora_module(m, torch.empty((rows, m.rank), device="meta"), torch.empty((m.rank, cols), device="meta")))
    return adapter


def _adapter(plan: Plan) -> Adapter:
    return Adapter(base_model=plan.arch if plan.arch != "generic" else "unknown", source_format="extract")


def warm_start(device: torch.device | str) -> Future | None:
    """The kernel warm-up of ``device`` (:func:`~loratool.ops.extract_startup.warming`: once per device and
    process), started now when a GPU extraction will need it, else None (also for a name torch refuses:
    the extraction says so where it takes the device)."""
    try:
        device = torch.device(device)
    except RuntimeError:
        return None
    return warming(device) if device.type == "cuda" else None


def compute_workers(device: torch.device) -> int:
    """Batches decomposed at once: two on a GPU, each on its own thread and stream, so that one thread's
    launches overlap the other's waits for the device (a batch waits for it twice: cuSOLVER's own check in
    the core SVD, then the one transfer of its checks, spectra and factors; meanwhile the device would
    idle); one on a CPU, whose
    cores the math already uses."""
    return 2 if device.type == "cuda" else 1


def _run(b: TensorSource, t: TensorSource, plan: Plan, options: ExtractOptions, dtype: torch.dtype,
         progress: Progress | None, clock: StageClock, sink: Sink | None = None
         ) -> tuple[list[ModuleReport], list[LoraModule]]:
    reports: list[ModuleReport] = []
    modules: list[LoraModule] = []
    done = 0
    device = torch.device(options.device)
    paths = (b.path, t.path)
    workers = compute_workers(device)
    streams: dict[int, torch.cuda.Stream] = {}
    t0 = time.perf_counter()
    warmed = warm_start(device)  # started before planning; the clock's "warm": how long it ran on after here

    def work(pair: PairBatch) -> tuple[list[ModuleReport], list[LoraModule]]:
        if device.type != "cuda":
            with clock.timed("compute"):
                return extract_batch(pair, options, dtype, paths)
        if warmed is not None:
            warmed.result()
        me = threading.get_ident()
        stream = streams.get(me) or streams.setdefault(me, torch.cuda.Stream(device))
        with torch.cuda.device(device), torch.cuda.stream(stream), clock.timed("compute"):
            return extract_batch(pair, options, dtype, paths)

    pairs = stream_pairs(b, t, plan.modules, device, clock)
    results = ((pair, work(pair)) for pair in pairs) if workers == 1 else prefetch(pairs, work, workers, workers)
    for pair, (r, mods) in results:
        reports += r
        modules += mods
        if sink is not None and mods:
            with clock.timed("sink"):
                sink(mods)
        done += len(pair.modules)
        if progress:
            progress(done, len(plan.modules), pair.modules[-1].key)
    if device.type == "cuda":
        with clock.timed("compute"):
            torch.cuda.synchronize(device)
    if warmed is not None and warmed.done() and warmed.exception() is None:  # taken by the first batch
        clock.add("warm", max(0.0, warmed.result() - t0))
    return reports, modules
