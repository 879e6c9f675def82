"""The kohya / LyCORIS layout: ``lora_unet_…``/``lora_te*_…`` ids, ``lora_down``/``lora_up``/``alpha``.

SD1/SD2 UNets keep diffusers block names, SDXL UNets use SAI block names (as sd-scripts writes them),
Flux uses BFL names (``lora_unet_double_blocks_…``; fused q/k/v required), text encoders are
``lora_te_`` (one CLIP), ``lora_te1_``/``lora_te2_`` (SDXL, SD3) and ``lora_te3_`` (T5), always with
``text_model_``. LoHa/LoKr/full/norm modules and Tucker cores are written as LyCORIS stores them.
Alpha is a 0-d tensor in the factors' dtype (float32/float64 when that dtype cannot hold it exactly);
rsLoRA modules get ``alpha·√r`` so that ``alpha/r`` is their scale.
"""

from __future__ import annotations

import math

import torch

from loratool.core.modules import Adapter, LoraModule, Module
from loratool.errors import LoraToolError
from loratool.formats import archinfo, names
from loratool.formats.build import lycoris_group
from loratool.formats.flux import swap_halves

KOHYA_SUFFIX = {
    "down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "dora_scale": "dora_scale",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm",
}


def te_prefix(base: str, component: str, components: set[str]) -> str:
    index = {"text_encoder": 1, "text_encoder_2": 2, "text_encoder_3": 3}[component]
    if base == "flux" and component == "text_encoder_2":
        return "lora_te3"  # kohya's Flux T5
    if base in ("sd1", "sd2") or (base == "unknown" and components & {"text_encoder_2", "text_encoder_3"} == set()):
        if component == "text_encoder":
            return "lora_te"
    return f"lora_te{index}"


def kohya_id(module: Module, base: str, components: set[str]) -> str:
    """The kohya module id of a canonical module (the name sd-scripts would give it)."""
    known = archinfo.to_kohya(base, module.key)
    if known is not None:
        return known
    comp, path = module.component, module.path
    if comp == "unet":
        sai = base == "sdxl"
        return "lora_unet_" + names.path_to_underscore(names.diffusers_unet_to_sai(path) if sai else path)
    if comp == "transformer":
        if base == "flux":
            bfl = names.diffusers_to_bfl(path)
            if bfl is None:
                raise LoraToolError(f"{module.key} has no kohya/BFL name (Flux stores q/k/v fused): fuse it first")
            return "lora_unet_" + names.path_to_underscore(bfl)
        return "lora_transformer_" + names.path_to_underscore(path)
    if comp.startswith("text_encoder"):
        return f"{te_prefix(base, comp, components)}_" + names.path_to_underscore(names.text_encoder_path(path))
    raise LoraToolError(f"{module.key}: the kohya layout has no prefix for component {comp!r}")


def alpha_tensor(alpha: float, like: torch.Tensor) -> torch.Tensor:
    """``alpha`` as a 0-d tensor in the factors' dtype when that dtype holds it exactly, else in the first
    of float32/float64 that does (loaders read ``float(alpha.item())``, so the value survives exactly)."""
    first = like.dtype if like.is_floating_point() else torch.float32
    for dtype in (first, torch.float32, torch.float64):
        t = torch.tensor(alpha, dtype=dtype)
        if float(t.item()) == alpha:
            return t
    return t


def kohya_alpha(module: Module) -> float | None:
    if module.alpha is None:
        return None
    if isinstance(module, LoraModule) and module.rslora:
        return float(module.alpha) * math.sqrt(module.rank)
    return float(module.alpha)


def swapped(module: Module, base: str) -> bool:
    """Whether the SAI/BFL name of this module holds its rows in swapped halves (final modulation)."""
    known = archinfo.rows_swapped(base, module.key)
    if known is not None:
        return known
    return base == "flux" and module.component == "transformer" and module.path == names.FLUX_SWAPPED


def encode_kohya(adapter: Adapter) -> dict[str, torch.Tensor]:
    base = adapter.base_model
    components = {m.component for m in adapter.modules.values()}
    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        mid = kohya_id(module, base, components)
        group = lycoris_group(module)
        if swapped(module, base) and not mid.startswith("lora_transformer_"):
            group = {r: swap_halves(t) if r in ("up", "diff_b") else t for r, t in group.items()}
        for role, tensor in group.items():
            key = f"{mid}.{KOHYA_SUFFIX.get(role, role)}"
            if key in out:
                raise LoraToolError(f"two modules map to the kohya key {key}")
            out[key] = tensor
        alpha = kohya_alpha(module)
        if alpha is not None:
            out[f"{mid}.alpha"] = alpha_tensor(alpha, module.tensors()[0])
    return out


def network_module(adapter: Adapter) -> str:
    """kohya's ``ss_network_module`` for this adapter: LyCORIS for any LoHa/LoKr/full/norm module or a
    Tucker LoRA (kohya's networks.lora cannot load a mid factor), else the base model's LoRA module."""
    from loratool.io.metadata import BASE_MODELS

    kinds = set(adapter.kinds)
    tucker = any(isinstance(m, LoraModule) and m.mid is not None for m in adapter.modules.values())
    if kinds - {"lora"} or tucker:
        return "lycoris.kohya"
    spec = BASE_MODELS.get(adapter.base_model)
    return spec.network_module if spec else "networks.lora"
