"""Bake adapters into a checkpoint: ``W ← W + w·ΔW`` on every targeted weight, streamed.

The plan (which LoRA module lands on which checkpoint tensor, and where inside it) comes from the
architecture tables: a single-file checkpoint through ``arch.modules[key].checkpoint_key`` and its
rows (fused OpenCLIP ``in_proj``, Flux ``qkv``/``linear1``, the swapped halves of a BFL final
modulation) and the layout op (``T``: stored transposed, ``conv1x1``: trailing 1×1 dims); a diffusers
folder through the component sub-folders, whose parameter names are the canonical paths. The
writing itself is :mod:`loratool.ops.merge_stream`: untouched tensors are copied byte for byte.

Math is float32 whatever the checkpoint stores; the result is cast back to the tensor's dtype.
DoRA modules apply ``W' = m·(W + ΔW)/‖W + ΔW‖`` along their axis, blended by the weight as ComfyUI
and Forge do (``W + w·(W' − W)``); other modules add ``w·ΔW`` (so a negative weight un-merges).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loratool.core.modules import LoraModule, Module, flat2d
from loratool.errors import LoraToolError
from loratool.ops.lbw import module_weights
from loratool.ops.mix import MixInput

Rows = tuple[int, int]


@dataclass(frozen=True)
class Placement:
    """Where a module's ΔW (in the layer's diffusers shape) lives inside one stored tensor."""

    rows: tuple[Rows, ...] | None = None  # stored rows holding ΔW's rows, in order (None: all)
    op: str | None = None  # "T": stored transposed; "conv1x1": stored with trailing 1x1 dims
    delta_rows: Rows | None = None  # only these rows of ΔW go here (a fused LoRA split over parts)


@dataclass
class Application:
    module: Module
    weight: float
    placement: Placement
    part: str = "weight"  # or "bias": the module's bias change
    source: str = ""


@dataclass
class MergePlan:
    """What a merge will do: tensors to change, per file (``""`` for a single-file checkpoint)."""

    arch: str
    files: dict[str, dict[str, list[Application]]] = field(default_factory=dict)
    matched: list[str] = field(default_factory=list)  # "source: module key"
    unmatched: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> int:
        return sum(len(t) for t in self.files.values())

    def summary(self) -> dict:
        return {"arch": self.arch, "matched_modules": len(self.matched), "unmatched_modules": len(self.unmatched),
                "tensors_changed": self.tensors, "unmatched": list(self.unmatched)}


def _region_views(w: torch.Tensor, placement: Placement) -> list[tuple[torch.Tensor, int, int]]:
    """Views into the stored tensor ``w``, each with the ΔW rows ``[start, stop)`` it holds."""
    t = w
    if placement.op == "T":
        t = t.t()
    elif placement.op == "conv1x1":
        t = t.reshape(t.shape[:2])
    ranges = placement.rows or ((0, int(t.shape[0])),)
    out, start = [], 0
    for a, b in ranges:
        out.append((t[a:b], start, start + b - a))
        start += b - a
    return out


def _delta_for(app: Application, rows: int, shape: tuple[int, ...]) -> torch.Tensor:
    if app.part == "bias":
        delta = app.module.bias.float()
    else:
        delta = app.module.delta(torch.float32)
    if app.placement.delta_rows is not None:
        delta = delta[slice(*app.placement.delta_rows)]
    want = (rows, *shape[1:])
    n = 1
    for s in want:
        n *= s
    if delta.numel() != n:
        raise LoraToolError(f"{app.source}: {app.module.key} has ΔW of shape {list(delta.shape)}, the checkpoint "
                            f"layer is {list(want)}: the LoRA is not for this model")
    return delta.reshape(want)


def apply_to_tensor(tensor: torch.Tensor, apps: list[Application]) -> torch.Tensor:
    """``tensor`` (any float dtype, any stored layout) with every application added, in its dtype."""
    w = tensor.to(torch.float32, copy=True)
    for app in apps:
        views = _region_views(w, app.placement)
        if _add_low_rank(app, views):
            continue
        rows = views[-1][2]
        delta = _delta_for(app, rows, tuple(views[0][0].shape)).to(w.device)
        dora = app.module.dora if app.part == "weight" else None
        if dora is None:
            for view, a, b in views:
                view.add_(delta[a:b].reshape(view.shape), alpha=app.weight)
            continue
        part = torch.cat([v.reshape(b - a, *delta.shape[1:]) for v, a, b in views])
        adapted = dora.apply(part.cpu(), delta.cpu()).to(w.device)
        new = part + app.weight * (adapted - part)
        for view, a, b in views:
            view.copy_(new[a:b].reshape(view.shape))
    lo, hi = torch.aminmax(w)  # one pass; NaN propagates, and the bound catches a cast overflowing
    limit = torch.finfo(tensor.dtype).max
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and -limit <= float(lo) and float(hi) <= limit):
        raise LoraToolError(f"the merged weight has values outside {tensor.dtype}'s range (a LoRA weight too large?)")
    return w.to(tensor.dtype)


def _add_low_rank(app: Application, views: list[tuple[torch.Tensor, int, int]]) -> bool:
    """``view += w·scale·up@down`` in place with ``addmm_`` (no ΔW allocated) for a plain LoRA whose
    factors line up with the stored rows; False where the general path is needed."""
    m = app.module
    if app.part != "weight" or m.dora is not None or not isinstance(m, LoraModule) or m.mid is not None:
        return False
    up, down = flat2d(m.up), flat2d(m.down)
    if app.placement.delta_rows is not None:
        up = up[slice(*app.placement.delta_rows)]
    if views[-1][2] != up.shape[0]:
        return False
    flat = [v.reshape(v.shape[0], -1) for v, _, _ in views]
    if any(f.shape[1] != down.shape[1] or f.data_ptr() != v.data_ptr() for f, (v, _, _) in zip(flat, views, strict=True)):
        return False  # a layout where the flat view would be a copy: use the general path
    down32 = down.to(flat[0].device, torch.float32)
    for f, (_, a, b) in zip(flat, views, strict=True):
        f.addmm_(up[a:b].to(f.device, torch.float32), down32, alpha=app.weight * m.scale)
    return True


# ---------------------------------------------------------------------------------------- planning


def load_arch_or_none(name: str | None):
    """The architecture table, or None for ``generic``/``unknown`` (tensor names are module paths);
    an unknown name is an error."""
    if not name or name in ("unknown", "generic"):
        return None
    from loratool.arch import load_arch

    return load_arch(name)


def _single_file_placement(arch, key: str, part: str, file_keys: set[str]) -> tuple[str, Placement] | None:
    """Where module ``key`` sits in a single-file checkpoint, or None."""
    if arch is not None:
        spec = arch.modules.get(key)
        if spec is not None and spec.checkpoint_key:
            ckey = spec.checkpoint_key
            if part == "bias":
                ckey = ckey.removesuffix(".weight") + ".bias"
            prefix = arch.checkpoint_prefix.get(spec.component, "")
            if ckey not in file_keys and prefix and ckey.startswith(prefix):
                ckey = ckey[len(prefix):]  # a bare component file (UNet-only / BFL transformer-only)
            if ckey in file_keys:
                param = arch.params.get((spec.component, f"{spec.path}.{part}"))
                op = param.op if param is not None and part == "weight" else None
                rows = (spec.checkpoint_rows,) if spec.checkpoint_rows else spec.row_order
                return ckey, Placement(rows=None if spec.is_fused else rows, op=op)
    path = key.partition(".")[2]
    for ckey in (f"{path}.{part}", f"{key}.{part}"):  # generic: the module path is the tensor name
        if ckey in file_keys:
            return ckey, Placement()
    return None


def _folder_placements(arch, key: str, part: str, files: dict[str, set[str]]) -> list[tuple[str, str, Placement]]:
    """``(file, tensor key, placement)`` for module ``key`` in a diffusers folder (a fused module
    — kohya's Flux qkv — lands on each of its parts)."""
    spec = arch.modules.get(key) if arch is not None else None
    parts = spec.parts if spec is not None and spec.is_fused else ((key, None),)
    out = []
    for part_key, rows in parts:
        component, _, path = part_key.partition(".")
        tensor_key = f"{path}.{part}"
        hits = [f for f, keys in files.items() if f.split("/")[0] == component and tensor_key in keys]
        if not hits:
            return []
        out.append((hits[0], tensor_key, Placement(delta_rows=rows)))
    return out


def plan_merge(inputs: list[MixInput], file_keys: dict[str, set[str]], arch_name: str,
               *, folder: bool, table=None) -> MergePlan:
    """Match every module of every input to the checkpoint's tensors.

    ``file_keys`` maps each checkpoint file (``""`` for a single file, ``component/name`` inside a
    folder) to its tensor names. ``table``: the family's table at the checkpoint's sizes
    (``arch.checkpoint_table``; a family described by rules differs per size), else ``arch_name``'s.
    """
    arch = table if table is not None else load_arch_or_none(arch_name)
    plan = MergePlan(arch=arch_name)
    for n, item in enumerate(inputs):
        name = item.name or f"input {n + 1}"
        _check_base(item, arch_name, name)
        weights = module_weights(item.adapter, item.weight, item.lbw,
                                 arch_name=arch_name if arch is not None else None, path=item.name or None).weights
        for key, module in item.adapter.modules.items():
            parts = ["weight"] + (["bias"] if module.bias is not None else [])
            found = []
            for part in parts:
                if folder:
                    hits = _folder_placements(arch, key, part, file_keys)
                else:
                    one = _single_file_placement(arch, key, part, file_keys[""])
                    hits = [("", *one)] if one else []
                found.extend((f, k, Application(module, weights[key], p, part, name)) for f, k, p in hits)
            if not found or (module.bias is not None and len({a.part for *_, a in found}) < 2):
                plan.unmatched.append(f"{name}: {key}")
                continue
            plan.matched.append(f"{name}: {key}")
            for f, k, app in found:
                plan.files.setdefault(f, {}).setdefault(k, []).append(app)
    return plan


def _check_base(item: MixInput, arch_name: str, name: str) -> None:
    base = item.adapter.base_model
    if base in ("", "unknown") or arch_name in ("", "unknown", "generic") or base == arch_name:
        return
    raise LoraToolError(f"{name} is a LoRA for {base}, the checkpoint is {arch_name}; pass --arch to override "
                        "if the detection is wrong")
