"""Fused projections of every family (the registry's fused groups): layouts in single-file names (kohya,
bfl) store one LoRA over a fused weight (Flux's and SD3's q/k/v, Flux's single-block ``linear1`` = q, k, v
and the MLP input); diffusers-named layouts store the parts apart.

The canonical adapter keeps whatever the file had: a fused pseudo-module (the family's table lists it
with the row range of each part) or the split modules. :func:`regroup_fused` makes it what the target
needs, exactly, with the codecs' fuse/split helpers (``loratool.formats.fuse``):

* to a split layout, a fused module becomes one LoRA per part (its block of a block-diagonal up
  with the matching rows of down, or the whole down shared with the part's rows of up);
* to a fused layout, the parts become one LoRA (downs stacked, ups block-diagonal; or a shared
  down with the ups stacked). A part the adapter does not train is a zero block: it takes one
  all-zero rank so that the fused weight keeps its full row count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loratool.arch import family_for
from loratool.core.modules import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.formats.fuse import fuse_lora, split_lora

if TYPE_CHECKING:
    from loratool.formats.layouts import Layout
    from loratool.ops.convert import ConvertReport, ModuleChange

Parts = list[tuple[str, tuple[int, int]]]


def fused_groups(adapter: Adapter) -> dict[str, Parts]:
    """The fused weights of the adapter's family at its sizes, with their parts in row order ({} for a family
    without any)."""
    return {key: sorted(parts, key=lambda p: p[1][0]) for key, parts in family_for(adapter).fused.items()}


def regroup_fused(adapter: Adapter, spec: Layout, report: ConvertReport) -> Adapter:
    """The adapter with fused projections fused or split as ``spec`` needs (unchanged otherwise)."""
    fused = fused_groups(adapter)
    if not fused:
        return adapter
    changes = {c.targets[0]: c for c in report.changes if c.targets}
    out = Adapter(metadata=adapter.metadata, base_model=adapter.base_model, source_format=adapter.source_format,
                  embeddings=adapter.embeddings, unknown=list(adapter.unknown), detection=adapter.detection)
    if spec.fused_for(family_for(adapter)):
        owner = {part: key for key, parts in fused.items() for part, _ in parts}
        done: set[str] = set()
        for key, module in adapter.modules.items():
            group = owner.get(key)
            if group is None:
                out.add(module)
            elif group not in done:
                done.add(group)
                out.add(_fuse(adapter, group, fused[group], changes))
        return out
    for key, module in adapter.modules.items():
        if key not in fused:
            out.add(module)
            continue
        for part in split_lora(_plain(module), fused[key]):
            out.add(part)
        change = changes.get(key)
        if change is not None:
            _record(change, "split", [p for p, _ in fused[key]])
    return out


def _plain(module) -> LoraModule:
    if not isinstance(module, LoraModule):
        raise LoraToolError(f"{module.key}: a fused {module.kind} module cannot be split into the q/k/v "
                            "modules this layout needs; --lossy turns it into LoRA first")
    return module


def _fuse(adapter: Adapter, group: str, parts: Parts, changes: dict[str, ModuleChange]) -> LoraModule:
    present = [adapter.modules.get(p) for p, _ in parts]
    template = next(m for m in present if m is not None)
    members: list[LoraModule] = []
    for (key, (r0, r1)), module in zip(parts, present, strict=True):
        if module is None:
            comp, _, path = key.partition(".")
            zeros_down = torch.zeros(1, template.down.shape[1], dtype=template.down.dtype)
            zeros_up = torch.zeros(r1 - r0, 1, dtype=template.up.dtype)
            module = LoraModule(comp, path, alpha=template.scale, down=zeros_down, up=zeros_up)
        members.append(_plain(module))
    comp, _, path = group.partition(".")
    fused = fuse_lora(members, comp, path)
    sources = [p for (p, _), m in zip(parts, present, strict=True) if m is not None]
    for i, key in enumerate(sources):
        change = changes.get(key)
        if change is not None:
            _record(change, "fuse", [group])
            if i and len(sources) > 1:
                change.note = f"fused with {sources[0]}"
    return fused


def _record(change: ModuleChange, action: str, targets: list[str]) -> None:
    change.action = action if change.action == "rename" else f"{change.action}+{action}"
    change.targets = targets
