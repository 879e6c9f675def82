"""Extract a LoRA from a base and a fine-tuned model: ΔW = W_tuned − W_base, truncated per module.

The pipeline streams: the inputs are opened as tensor sources (:mod:`loratool.io.sources`: single
files, diffusers, component or HF model folders, sharded or not), a background thread reads tensor
pairs batch by batch (positional reads of only the rows a module needs, into pinned staging buffers
on CUDA), batches hold same-shaped modules, the host→device copy of the next batch is issued on a
side stream before the current batch is decomposed, and only the small factors come back. Peak
memory is a few batches, not two models. Pure library code: progress goes to a callback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from loratool.core.dtypes import DTYPES
from loratool.core.modules import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.io.prefetch import StagingRing, prefetch
from loratool.io.sources import TensorSource, open_source
from loratool.io.weights import read_weight, weight_nbytes
from loratool.linalg import clamp_factors, decompose, split_singular
from loratool.ops.extract_plan import ExtractOptions, Plan, PlannedModule, build_plan
from loratool.ops.extract_report import ModuleReport, compact, summarize

Progress = Callable[[int, int, str], None]  # (modules done, total, last module key)
BATCH_BYTES = {"cuda": 128 << 20, "cpu": 64 << 20}  # stored bytes of a batch's base + tuned weights
SLOTS = 3  # pinned staging buffers: one being filled, one queued, one being copied


@dataclass
class ExtractResult:
    adapter: Adapter
    plan: Plan
    reports: list[ModuleReport]
    summary: dict
    dtype: torch.dtype

    def compact_report(self) -> str:
        return compact(self.reports, self.summary)

    def full_report(self) -> dict:
        return {"arch": self.plan.arch, "summary": self.summary, "modules": [r.as_dict() for r in self.reports]}


@contextmanager
def open_pair(base: str | os.PathLike[str], tuned: str | os.PathLike[str]) -> Iterator[tuple[TensorSource, TensorSource]]:
    """Both models opened as tensor sources (headers only), closed on exit."""
    b = _open_model(base)
    try:
        t = _open_model(tuned)
    except BaseException:
        b.close()
        raise
    try:
        yield b, t
    finally:
        b.close()
        t.close()


def _open_model(path: str | os.PathLike[str]) -> TensorSource:
    src = open_source(path)
    if src.kind == "peft":
        src.close()
        raise LoraToolError("this is a LoRA adapter (peft), not a model to extract from", path)
    return src


def plan_extract(base: str | os.PathLike[str], tuned: str | os.PathLike[str], options: ExtractOptions) -> Plan:
    """The plan alone (``--dry-run``, or to choose an output layout): modules, shapes and ranks from
    the headers; no tensor is read. Pass it to :func:`extract` so that planning happens once."""
    with open_pair(base, tuned) as (b, t):
        return build_plan(b, t, options)


def extract(base: str | os.PathLike[str], tuned: str | os.PathLike[str], options: ExtractOptions,
            progress: Progress | None = None, *, plan: Plan | None = None) -> ExtractResult:
    """Extract a LoRA of ``tuned − base``; ``plan`` (from :func:`plan_extract` on the same inputs and
    options) skips planning again."""
    with open_pair(base, tuned) as (b, t):
        plan = plan or build_plan(b, t, options)
        dtype = output_dtype(options.dtype, t, plan)
        reports, modules = _run(b, t, plan, options, dtype, progress)
    adapter = Adapter(base_model=plan.arch if plan.arch != "generic" else "unknown", source_format="extract")
    for m in modules:
        adapter.add(m)
    order = {m.key: i for i, m in enumerate(plan.modules)}
    reports.sort(key=lambda r: order[r.key])
    summary = summarize(reports, plan.excluded, plan.missing)
    return ExtractResult(adapter, plan, reports, summary, dtype)


def output_dtype(name: str | None, tuned: TensorSource, plan: Plan) -> torch.dtype:
    if name is not None:
        if name not in DTYPES:
            raise LoraToolError(f"--dtype {name}: use fp16, bf16 or fp32")
        return DTYPES[name]
    stored = tuned.dtype(plan.modules[0].ref.segments[0].key)
    return stored if stored in DTYPES.values() else torch.float32


def batches(modules: list[PlannedModule], budget: int, nbytes=None) -> list[list[PlannedModule]]:
    """Same-shaped, same-rank modules grouped (in plan order of first appearance), each batch at most
    ``budget`` bytes by ``nbytes(module)`` (default: the fp32 ΔW), and at least one module."""
    nbytes = nbytes or (lambda m: 4 * math.prod(m.matrix_shape))
    groups: dict[tuple, list[PlannedModule]] = {}
    for m in modules:
        groups.setdefault((m.matrix_shape, m.rank, m.is_text_encoder), []).append(m)
    out = []
    for group in groups.values():
        per = max(1, budget // max(1, nbytes(group[0])))
        out.extend(group[i:i + per] for i in range(0, len(group), per))
    return out


def stream_pairs(b: TensorSource, t: TensorSource, modules: list[PlannedModule], device: torch.device) -> Iterator:
    """``(batch, base weights, tuned weights)`` on ``device``, batch by batch, read ahead on a thread.

    On CUDA the reads land in a few pinned staging buffers and the copy of the next batch runs on a
    side stream while the caller works on the current one.
    """
    if device.type != "cuda":
        def load_cpu(batch):
            return [read_weight(b, m.ref) for m in batch], [read_weight(t, m.ref) for m in batch]

        jobs = batches(modules, BATCH_BYTES["cpu"], lambda m: _pair_bytes(b, t, m))
        for batch, (base_w, tuned_w) in prefetch(jobs, load_cpu, ahead=2):
            yield batch, base_w, tuned_w
        return
    largest = max(_pair_bytes(b, t, m) for m in modules)
    ring = StagingRing(max(BATCH_BYTES["cuda"], largest), SLOTS)
    jobs = batches(modules, ring.slot_bytes, lambda m: _pair_bytes(b, t, m))

    def load(batch):
        slot, offset, out = ring.take(), 0, ([], [])
        for m in batch:
            for src, side in ((b, out[0]), (t, out[1])):
                side.append(read_weight(src, m.ref, slot[offset:]))
                offset += weight_nbytes(src, m.ref)
        return slot, out

    try:
        yield from _upload_ahead(prefetch(jobs, load, ahead=2), ring, device)
    finally:
        ring.close()


def _pair_bytes(b: TensorSource, t: TensorSource, m: PlannedModule) -> int:
    return weight_nbytes(b, m.ref) + weight_nbytes(t, m.ref)


def _upload_ahead(items: Iterator, ring: StagingRing, device: torch.device) -> Iterator:
    stream = torch.cuda.Stream(device)
    pending = None
    for batch, (slot, (base_w, tuned_w)) in items:
        with torch.cuda.stream(stream):
            moved = ([x.to(device, non_blocking=True) for x in base_w],
                     [x.to(device, non_blocking=True) for x in tuned_w])
            event = torch.cuda.Event()
            event.record(stream)
        if pending is not None:
            yield _ready(pending, ring)
        pending = (batch, moved, event, slot)
    if pending is not None:
        yield _ready(pending, ring)


def _ready(pending, ring: StagingRing):
    batch, moved, event, slot = pending
    event.synchronize()  # the copy out of the slot is done: hand it back to the reader
    ring.give(slot)
    current = torch.cuda.current_stream()
    for x in (*moved[0], *moved[1]):
        x.record_stream(current)
    return batch, moved[0], moved[1]


def _run(b: TensorSource, t: TensorSource, plan: Plan, options: ExtractOptions, dtype: torch.dtype,
         progress: Progress | None) -> tuple[list[ModuleReport], list[LoraModule]]:
    reports: list[ModuleReport] = []
    modules: list[LoraModule] = []
    done = 0
    for batch, base_w, tuned_w in stream_pairs(b, t, plan.modules, torch.device(options.device)):
        r, mods = _extract_batch(batch, base_w, tuned_w, options, dtype, (b.path, t.path))
        reports += r
        modules += mods
        done += len(batch)
        if progress:
            progress(done, len(plan.modules), batch[-1].key)
    return reports, modules


def _require_finite(batch: list[PlannedModule], base_w: list[torch.Tensor], tuned_w: list[torch.Tensor],
                    paths: tuple[str, str]) -> None:
    """Refuse a weight holding NaN or ±inf, naming the tensor and the file (its ΔW would have no SVD)."""
    for mod, pair in zip(batch, zip(base_w, tuned_w, strict=True), strict=True):
        for w, path, side in zip(pair, paths, ("BASE", "TUNED"), strict=True):
            if not bool(torch.isfinite(w if w.element_size() > 1 else w.float()).all()):
                names = ", ".join(seg.key for seg in mod.ref.segments)
                raise LoraToolError(f"tensor {names} (module {mod.key}) holds NaN or infinite values in {side}: "
                                    "there is no low-rank difference to extract", path)


def _extract_batch(batch: list[PlannedModule], base_w: list[torch.Tensor], tuned_w: list[torch.Tensor],
                   options: ExtractOptions, dtype: torch.dtype, paths: tuple[str, str] = ("BASE", "TUNED"),
                   ) -> tuple[list[ModuleReport], list[LoraModule]]:
    m, n = batch[0].matrix_shape
    base = torch.stack([x.reshape(m, n) for x in base_w]).float()
    delta = torch.stack([x.reshape(m, n) for x in tuned_w]).float() - base
    d2 = delta.norm(dim=(1, 2)).double().square().cpu().tolist()
    b2 = base.norm(dim=(1, 2)).double().square().cpu().tolist()
    del base
    if not all(map(math.isfinite, d2 + b2)):  # NaN/inf makes a norm so: find the tensor only then
        _require_finite(batch, base_w, tuned_w, paths)
    reports, keep = [], []
    for i, mod in enumerate(batch):
        change = math.sqrt(d2[i] / b2[i]) if b2[i] > 0 else (math.inf if d2[i] > 0 else 0.0)
        if d2[i] == 0:
            reports.append(ModuleReport(mod.key, mod.shape, "unchanged", 0.0))
        elif mod.is_text_encoder and change < options.min_change:
            reports.append(ModuleReport(mod.key, mod.shape, "below_min_change", change))
        else:
            keep.append((i, change))
    if not keep:
        return reports, []
    idx = [i for i, _ in keep]
    sub = delta[idx]
    truncs = decompose(sub, [batch[i].key for i in idx], batch[0].rank, options.rank_mode, options.policy)
    modules = []
    for (i, change), a, tr in zip(keep, sub, truncs, strict=True):
        mod = batch[i]
        up, down = _factors(tr, options.clamp_quantile, dtype)
        err = float((a - up.float() @ down.float()).norm() / a.norm())
        reports.append(ModuleReport(mod.key, mod.shape, "ok", change, tr.rank, err, tr.retained, tr.method))
        modules.append(_lora_module(mod, up.cpu(), down.cpu()))
    return reports, modules


def _factors(tr, clamp_q: float | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``up = U·√S``, ``down = √S·Vh`` (the split keeps both in fp16 range), clamped if asked, cast."""
    up, down = split_singular(tr.u, tr.s, tr.vh, dtype=torch.float32)
    if clamp_q is not None:
        up, down = clamp_factors(up, down, clamp_q)
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


def _lora_module(mod: PlannedModule, up: torch.Tensor, down: torch.Tensor) -> LoraModule:
    r = up.shape[1]
    if len(mod.shape) == 4:
        up = up.reshape(mod.shape[0], r, 1, 1)
        down = down.reshape(r, *mod.shape[1:])
    elif len(mod.shape) > 2:  # generic n-d weights: the factor keeps the flattened trailing dims
        down = down.reshape(r, -1)
    return LoraModule(component=mod.component, path=mod.path, alpha=float(r), down=down, up=up)
