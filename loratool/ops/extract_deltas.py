"""Bias and norm deltas beside an extracted LoRA: how the step-distillation LoRAs for Wan are made (lightx2v,
CausVid: ``.diff_b`` for every adapted layer's bias, ``.diff`` for the norm weights).

:func:`add_bias_and_norm_deltas` reads ``tuned − base`` of the biases of the modules the adapter already has
(a LoRA's ``bias``, written ``diff_b`` by the kohya-style and single-file layouts; :func:`check_deltas`
refuses the layouts with no place for it) and of the family's norm weights (the table's ``norm`` group: a
:class:`FullModule`, written ``.diff``). Deltas that are exactly zero are left out, and so is the bias of a
layer a checkpoint stores only as rows of a fused weight. Where a checkpoint keeps a tensor is the family
table's business (its single-file key, or the diffusers path in a component file or folder).
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from loratool.arch.table import Arch, ModuleSpec
from loratool.core.modules import Adapter, FullModule, LoraModule
from loratool.errors import LoraToolError
from loratool.io.sources import TensorSource


def _key(arch: Arch, spec: ModuleSpec, part: str, keys: set[str]) -> str | None:
    """Where ``spec``'s ``part`` (``weight``/``bias``) is in a file with ``keys``, when it is a whole tensor."""
    names = [f"{spec.path}.{part}", f"{spec.component}.{spec.path}.{part}"]
    if spec.checkpoint_key and spec.checkpoint_rows is None and spec.row_order is None:
        ckey = spec.checkpoint_key.removesuffix(".weight") + f".{part}"
        names += [ckey, ckey.removeprefix(arch.checkpoint_prefix.get(spec.component, ""))]
    return next((n for n in names if n in keys), None)


def _delta(base: TensorSource, tuned: TensorSource, key: str) -> torch.Tensor | None:
    delta = tuned.get(key).float() - base.get(key).float()
    return delta if delta.any() else None


def add_bias_and_norm_deltas(adapter: Adapter, base: TensorSource, tuned: TensorSource, arch: Arch, *,
                             biases: bool = True, norms: bool = True) -> list[str]:
    """Add the bias deltas of the adapter's LoRA modules and the family's norm-weight deltas (in the adapter's
    dtype); returns the keys of what was added. ``arch``: the family's table at the checkpoint's sizes
    (``arch.checkpoint_table``: the adapter alone does not show every block)."""
    keys = set(base.keys()) & set(tuned.keys())
    added = []
    dtype = next(iter(adapter.modules.values())).tensors()[0].dtype if adapter.modules else torch.float32
    if biases:
        for key, module in adapter.modules.items():
            spec = arch.modules.get(key)
            found = _key(arch, spec, "bias", keys) if spec is not None and isinstance(module, LoraModule) else None
            delta = _delta(base, tuned, found) if found else None
            if delta is not None:
                module.bias = (delta / module.scale).to(dtype)  # a LoRA's bias change is scaled like its ΔW
                added.append(f"{key}.bias")
    if norms:
        for spec in arch.modules.values():
            if spec.group != "norm" or spec.key in adapter.modules:
                continue
            found = _key(arch, spec, "weight", keys)
            delta = _delta(base, tuned, found) if found else None
            if delta is None:
                continue
            bias_key = _key(arch, spec, "bias", keys)
            bias = _delta(base, tuned, bias_key) if bias_key else None
            adapter.add(FullModule(spec.component, spec.path, diff=delta.to(dtype),
                                   bias=None if bias is None else bias.to(dtype)))
            added.append(spec.key)
    return added


_NO_FAMILY = ("--deltas needs a model family (its table says which weights are norms and where each layer's bias "
              "is); this pair has none (--arch generic)")


def add_deltas(adapter: Adapter, base: TensorSource, tuned: TensorSource, family: str,
               which: Collection[str]) -> list[str]:
    """``extract --deltas``: :func:`add_bias_and_norm_deltas` with the family's table at the checkpoint's sizes;
    ``which`` holds ``bias`` and/or ``norm``. A generic pair has no family table to say which tensors are norms."""
    from loratool.arch import checkpoint_table

    arch = checkpoint_table(family, base.shapes())
    if arch is None:
        raise LoraToolError(_NO_FAMILY)
    return add_bias_and_norm_deltas(adapter, base, tuned, arch, biases="bias" in which, norms="norm" in which)


def check_deltas(family: str, layout: str, which: Collection[str]) -> None:
    """Refuse before any tensor is read: a pair of no family (``generic``), or an output layout with no place for
    the deltas asked for."""
    from loratool.formats.layouts import writable_layout

    if family in ("generic", "unknown"):
        raise LoraToolError(_NO_FAMILY)
    if "norm" in which:
        from loratool.arch import load_arch

        if not any(spec.group == "norm" for spec in load_arch(family).modules.values()):
            raise LoraToolError(f"--deltas norm: the {family} table lists no norm weights (Wan's does, whose "
                                "distill LoRAs carry them); --deltas bias adds the bias changes alone")
    lay = writable_layout(layout)
    where = "kohya, musubi or bfl"
    if "bias" in which and not lay.bias:
        raise LoraToolError(f"--deltas bias: the {lay.name} layout has no place for a bias change (.diff_b); "
                            f"write {where}")
    if "norm" in which and "full" not in lay.kinds:
        raise LoraToolError(f"--deltas norm: the {lay.name} layout holds LoRA factors only, not a norm weight's "
                            f"change (.diff); write {where}")
