"""The layouts with kohya-style ids: ``kohya`` (``lora_unet_…``/``lora_te*_…``), ``lycoris`` (the LyCORIS
wrapper's ``lycoris_…``), ``onetrainer`` (``lora_transformer_…``) and ``musubi`` (musubi-tuner's ``lora_unet_…``
in the names the trainer uses), with ``lora_down``/``lora_up``/``alpha``.

Which names the ids carry (diffusers or single-file block names, fused or split projections, the text
encoders' prefixes) is the family's spelling (``loratool.arch.Family.spell``); this codec only knows the
suffixes. LoHa/LoKr/full/norm modules and Tucker cores are written as LyCORIS stores them.
Alpha is a 0-d tensor in the factors' dtype (float32/float64 when that dtype cannot hold it exactly);
rsLoRA modules get ``alpha·√r`` so that ``alpha/r`` is their scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from loratool.arch import Family
from loratool.core.modules import Adapter, LoraModule, Module
from loratool.errors import LoraToolError
from loratool.formats.build import lycoris_group, swap_halves

KOHYA_SUFFIX = {
    "down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "dora_scale": "dora_scale",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm",
}


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


def spelled_id(family: Family, style: str, module: Module, single_te: bool = False) -> tuple[str, bool]:
    """The kohya-style id of a module in ``style`` (kohya, lycoris, onetrainer) and whether its rows swap."""
    spelling = family.spell(style, module.component, module.path, single_te=single_te)
    if spelling is None:
        spec = family.modules.get(module.key)
        if module.key in family.fused:
            why = "a fused weight: this layout names q/k/v apart (split it first)"
        elif spec is not None and spec.fused_in:
            why = f"a part of {spec.fused_in}, which this layout stores fused (fuse it first)"
        else:
            why = f"the {style} layout has no name for a {module.component} module of {family.name}"
        raise LoraToolError(f"{module.key}: {why}")
    return f"{spelling.scope}_{spelling.name}", spelling.swapped


def encode_named(adapter: Adapter, family: Family, style: str) -> dict[str, torch.Tensor]:
    """kohya-style keys (``<id>.lora_down.weight``, LyCORIS suffixes, ``<id>.alpha``) for every module."""
    one = module_encoder(adapter, family, style)
    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        for key, tensor in one(module).items():
            if key in out:
                raise LoraToolError(f"two modules map to the {style} key {key}")
            out[key] = tensor
    return out


def module_encoder(adapter: Adapter, family: Family, style: str) -> Callable[[Module], dict[str, torch.Tensor]]:
    """The keys and tensors of one module of ``adapter`` (whose components decide the text encoders'
    prefixes) in a kohya-style layout: what :func:`encode_named` gives for it, module by module."""
    single_te = not {m.component for m in adapter.modules.values()} & {"text_encoder_2", "text_encoder_3"}

    def encode(module: Module) -> dict[str, torch.Tensor]:
        mid, swapped = spelled_id(family, style, module, single_te)
        group = lycoris_group(module)
        if swapped:
            group = {r: swap_halves(t) if r in ("up", "diff_b") else t for r, t in group.items()}
        out = {f"{mid}.{KOHYA_SUFFIX.get(role, role)}": tensor for role, tensor in group.items()}
        alpha = kohya_alpha(module)
        if alpha is not None:
            out[f"{mid}.alpha"] = alpha_tensor(alpha, module.tensors()[0])
        return out

    return encode


NAMED_LAYOUTS = frozenset({"kohya", "lycoris", "onetrainer", "musubi"})  # each is the style it spells


def encode_kohya(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return encode_named(adapter, family, "kohya"), {}


def encode_lycoris(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return encode_named(adapter, family, "lycoris"), {}


def encode_onetrainer(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return encode_named(adapter, family, "onetrainer"), {}


def encode_musubi(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from loratool.formats.diffusers import LAYOUT_KEY

    return encode_named(adapter, family, "musubi"), {LAYOUT_KEY: "musubi"}


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
