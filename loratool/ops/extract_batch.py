"""One batch of an extraction: same-shaped weight pairs in, LoRA factors and reports out.

The device is asked to wait for the host as little as possible (each wait empties its queue): a
pair is recognised as unchanged by comparing its stored bits (no float copies: an unchanged
embedding costs one comparison), ΔW is formed in float32 only for the changed ones, the batch is
decomposed at once, and the factors, their errors as stored (cast to the output dtype) and the
norms come back together.
"""

from __future__ import annotations

import math

import torch

from loratool.core.modules import LoraModule
from loratool.linalg import Truncations, clamp_factors, decompose_batch, split_singular
from loratool.ops.extract_plan import ExtractOptions, PlannedModule
from loratool.ops.extract_report import ModuleReport
from loratool.ops.extract_stream import PairBatch

CHUNK = 1 << 24  # elements: norms and residuals of large weights are taken this many at a time
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def extract_batch(pair: PairBatch, options: ExtractOptions, dtype: torch.dtype
                  ) -> tuple[list[ModuleReport], list[LoraModule]]:
    """Reports for every module of the batch, and a LoRA module for each one extracted."""
    if pair.ready is not None:  # CUDA: the copies ran on the reader's stream
        current = torch.cuda.current_stream()
        current.wait_event(pair.ready)
        for x in (*pair.base, *pair.tuned):
            x.record_stream(current)
    batch = pair.modules
    m, n = batch[0].matrix_shape
    base = [x.reshape(m, n) for x in pair.base]
    tuned = [x.reshape(m, n) for x in pair.tuned]
    pair.base = pair.tuned = []  # the batch's memory goes with these lists
    changed = changed_flags(base, tuned)
    reports = [ModuleReport(mod.key, mod.shape, "unchanged", 0.0) for mod, c in zip(batch, changed, strict=True)
               if not c]
    idx = [i for i, c in enumerate(changed) if c]
    if not idx:
        return reports, []
    delta = torch.empty((len(idx), m, n), dtype=torch.float32, device=base[0].device)
    for j, i in enumerate(idx):
        delta[j].copy_(tuned[i])
        delta[j].sub_(base[i])
    base_sq = torch.stack([sq_norm(base[i]) for i in idx])
    del tuned
    if batch[0].is_text_encoder:  # the --min-change test needs the norms before the work
        idx, delta, base_sq, skipped = _min_change(batch, idx, delta, base_sq, options.min_change)
        reports += skipped
        if not idx:
            return reports, []
    del base
    names = [batch[i].key for i in idx]
    tr = decompose_batch(delta, names, batch[0].rank, options.rank_mode, options.policy)
    if tr.uniform and options.clamp_quantile is None:
        r, mods = _stacked(batch, idx, delta, base_sq, tr, dtype)
    else:
        r, mods = _one_by_one(batch, idx, delta, base_sq, tr, options.clamp_quantile, dtype)
    return reports + r, mods


def changed_flags(base: list[torch.Tensor], tuned: list[torch.Tensor]) -> list[bool]:
    """Whether each pair differs in any stored bit (so ``-0.0`` vs ``0.0`` counts as a change, and a NaN
    left as it was does not); one wait for the device."""
    if base[0].device.type == "cpu":
        return [not torch.equal(_bits(b), _bits(t)) for b, t in zip(base, tuned, strict=True)]
    flags = torch.stack([(_bits(b) != _bits(t)).any() for b, t in zip(base, tuned, strict=True)])
    return flags.cpu().tolist()


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_BITS[x.element_size()])


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖_F² in float64 (a 0-d device tensor), read in chunks so that no float32 copy of a large
    stored weight is made."""
    flat = x.reshape(-1)
    parts = [torch.linalg.vector_norm(flat[i:i + CHUNK], dtype=torch.float32).double().square()
             for i in range(0, flat.numel(), CHUNK)]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=x.device)


def residual_sq(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """‖ΔW − up·down‖_F² per matrix of a batch (float64 ``[b]``), rows a chunk at a time."""
    b, m, n = delta.shape
    rows = max(1, CHUNK // max(1, b * n))
    total = torch.zeros(b, dtype=torch.float64, device=delta.device)
    for r in range(0, m, rows):
        part = torch.baddbmm(delta[:, r:r + rows], up[:, r:r + rows], down, alpha=-1)
        total += torch.linalg.vector_norm(part, dim=(1, 2)).double().square()
    return total


def _min_change(batch, idx, delta, base_sq, min_change: float):
    d2 = torch.linalg.vector_norm(delta, dim=(1, 2)).double().square()
    host = torch.stack([d2, base_sq]).cpu()
    keep, skipped = [], []
    for j, i in enumerate(idx):
        change = _change(float(host[0, j]), float(host[1, j]))
        if change < min_change:
            skipped.append(ModuleReport(batch[i].key, batch[i].shape, "below_min_change", change))
        else:
            keep.append(j)
    if len(keep) == len(idx):
        return idx, delta, base_sq, skipped
    return [idx[j] for j in keep], delta[keep], base_sq[keep], skipped


def _change(d2: float, b2: float) -> float:
    """‖ΔW‖_F / ‖W‖_F (∞ for a change to a zero weight)."""
    return math.sqrt(d2 / b2) if b2 > 0 else (math.inf if d2 > 0 else 0.0)


def _stacked(batch, idx, delta, base_sq, tr: Truncations, dtype: torch.dtype):
    """Every matrix kept at the cap: split, cast, measure and copy back as one batch."""
    up, down = split_singular(tr.u, tr.s, tr.vh, dtype=torch.float32)
    up, down = up.to(dtype), down.to(dtype)
    err_sq = residual_sq(delta, up.float(), down.float())
    host = torch.stack([err_sq, base_sq]).cpu().tolist()
    up, down = up.cpu(), down.cpu()
    reports, modules = [], []
    for j, i in enumerate(idx):
        mod, d2 = batch[i], tr.totals_sq[j]
        if d2 == 0:  # other bits, the same values (-0.0 for 0.0)
            reports.append(ModuleReport(mod.key, mod.shape, "unchanged", 0.0))
            continue
        err = math.sqrt(host[0][j] / d2)
        reports.append(ModuleReport(mod.key, mod.shape, "ok", _change(d2, host[1][j]), tr.ranks[j], err,
                                    tr.retained(j), tr.method))
        modules.append(lora_module(mod, up[j], down[j]))
    return reports, modules


def _one_by_one(batch, idx, delta, base_sq, tr: Truncations, clamp_q: float | None, dtype: torch.dtype):
    """Ranks that differ per matrix (a dynamic rank mode) or a clamp: module by module."""
    norms = base_sq.cpu().tolist()
    reports, modules = [], []
    for j, i in enumerate(idx):
        mod, one = batch[i], tr[j]
        if one.total_sq == 0:
            reports.append(ModuleReport(mod.key, mod.shape, "unchanged", 0.0))
            continue
        up, down = split_singular(one.u, one.s, one.vh, dtype=torch.float32)
        if clamp_q is not None:
            up, down = clamp_factors(up, down, clamp_q)
        up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
        d2 = one.total_sq
        err = math.sqrt(float(residual_sq(delta[j:j + 1], up.float()[None], down.float()[None])[0]) / d2)
        reports.append(ModuleReport(mod.key, mod.shape, "ok", _change(d2, norms[j]), one.rank, err, one.retained,
                                    one.method))
        modules.append(lora_module(mod, up.cpu(), down.cpu()))
    return reports, modules


def lora_module(mod: PlannedModule, up: torch.Tensor, down: torch.Tensor) -> LoraModule:
    """The canonical module for factors of the layer's matrix (``up [out, r]``, ``down [r, in·k·k]``)."""
    r = up.shape[1]
    if len(mod.shape) == 4:
        up = up.reshape(mod.shape[0], r, 1, 1)
        down = down.reshape(r, *mod.shape[1:])
    elif len(mod.shape) > 2:  # generic n-d weights: the factor keeps the flattened trailing dims
        down = down.reshape(r, -1)
    return LoraModule(component=mod.component, path=mod.path, alpha=float(r), down=down, up=up)
