"""Layouts in single-file (original checkpoint) names under ``diffusion_model.``, as ComfyUI names a model's
weights: ``bfl`` for DiTs (BFL Flux, SAI SD3) and ``ldm`` for SD UNets (LDM/SGM block names).

* bfl: a LoRA as ``lora_A``/``lora_B`` with the scale folded in (ai-toolkit's and ComfyUI's Flux files, diffusion-pipe's
  and the distill LoRAs' Wan files), a bias change as ``diff_b``;
  LyCORIS kinds (LoKr, LoHa, full, norm) with their own suffixes and alpha, as ComfyUI reads them;
* ldm: ``lora_down``/``lora_up``/``alpha`` and the LyCORIS suffixes, as ComfyUI saves SD LoRAs.
Which single-file name a module has (fused q/k/v, rows swapped) is the family's spelling.
"""

from __future__ import annotations

import torch

from loratool.arch import Family
from loratool.core.modules import Adapter, LoraModule, Module
from loratool.errors import LoraToolError
from loratool.formats.build import lycoris_group, swap_halves
from loratool.formats.fuse import fold_scale
from loratool.formats.kohya import KOHYA_SUFFIX, alpha_tensor, kohya_alpha


def _name(family: Family, module: Module, fmt: str) -> tuple[str, bool]:
    spelling = family.spell("original", module.component, module.path)
    if spelling is None:
        spec = family.modules.get(module.key)
        if spec is not None and spec.fused_in:
            raise LoraToolError(f"{module.key} has no {fmt} name ({fmt} stores {spec.fused_in} fused): fuse it first")
        raise LoraToolError(f"{module.key}: the {fmt} layout names the {family.denoiser or 'denoiser'} of "
                            f"{family.name} only")
    return f"{spelling.scope}.{spelling.name}", spelling.swapped


def _lycoris_keys(module: Module, prefix: str, swapped: bool, out: dict[str, torch.Tensor]) -> None:
    group = lycoris_group(module)
    if swapped:
        group = {r: swap_halves(t) if r in ("up", "diff_b") else t for r, t in group.items()}
    for role, tensor in group.items():
        out[f"{prefix}.{KOHYA_SUFFIX.get(role, role)}"] = tensor
    alpha = kohya_alpha(module)
    if alpha is not None:
        out[f"{prefix}.alpha"] = alpha_tensor(alpha, module.tensors()[0])


def encode_bfl(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        prefix, swapped = _name(family, module, "bfl")
        if not isinstance(module, LoraModule):
            if swapped:
                raise LoraToolError(f"{module.key}: a {module.kind} module over swapped modulation rows has no "
                                    "bfl form")
            _lycoris_keys(module, prefix, False, out)
            continue
        if module.mid is not None:
            raise LoraToolError(f"{module.key}: a Tucker lora_mid core cannot be written as bfl")
        m = fold_scale(module)
        up, bias = m.up, m.bias
        if swapped:
            up, bias = swap_halves(up), None if bias is None else swap_halves(bias)
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = m.down, up
        if bias is not None:  # the whole bias change (scale folded): what ComfyUI and diffusers' converters read
            out[f"{prefix}.diff_b"] = bias
        if m.dora is not None:
            raise LoraToolError(f"{module.key}: the bfl layout has no place for a DoRA magnitude")
    return out, {}


def encode_ldm(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        prefix, swapped = _name(family, module, "ldm")
        _lycoris_keys(module, prefix, swapped, out)
    return out, {}
