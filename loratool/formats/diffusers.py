"""Layouts with ``lora_A``/``lora_B`` keys: diffusers pipeline files, peft folders, ai-toolkit and BFL Flux.

* diffusers: ``<component>.<path>.lora_A.weight`` and alpha in the ``lora_adapter_metadata`` entry
  (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``, …);
* peft: ``base_model.model.<path>.lora_A.weight`` and ``adapter_config.json``, one model per folder;
  CLIP paths as the model class it is loaded into names them (``names.peft_text_encoder_path``: a
  transformers-5 CLIPTextModel has no ``text_model.``), unlike every other layout here;
* ai-toolkit (Flux): ``transformer.<diffusers path>`` without any alpha: the scale is folded into the
  factors (√scale on each);
* BFL (Flux): ``diffusion_model.<BFL path>`` (fused q/k/v), scale folded likewise.
DoRA is peft's ``lora_magnitude_vector`` (output axis only); a LoRA bias is ``lora_B.bias``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping

import torch

from loratool.core.modules import Adapter, LoraModule, Module
from loratool.errors import LoraToolError
from loratool.formats import names
from loratool.formats.build import peft_magnitude
from loratool.formats.flux import swap_halves
from loratool.formats.fuse import fold_scale
from loratool.formats.kohya import swapped
from loratool.formats.peftcfg import METADATA_KEY, build_config

_FUSED = ("attn.to_qkv", "attn.to_added_qkv", "to_qkv_mlp")


def _lora_only(module: Module, fmt: str) -> LoraModule:
    if not isinstance(module, LoraModule):
        raise LoraToolError(f"{module.key}: a {module.kind} module cannot be written as {fmt} "
                            "(LoRA only; convert it to LoRA first)")
    if module.mid is not None:
        raise LoraToolError(f"{module.key}: a Tucker lora_mid core cannot be written as {fmt} (no such key there)")
    return module


def _path(module: Module, fmt: str) -> str:
    if module.component == "transformer" and module.path.endswith(_FUSED):
        raise LoraToolError(f"{module.key} is a fused (BFL/SAI) weight: {fmt} stores q/k/v apart, split it first")
    if module.component.startswith("text_encoder"):
        return names.text_encoder_path(module.path)
    return module.path


def _factor_keys(prefix: str, m: LoraModule, out: dict[str, torch.Tensor]) -> None:
    out[f"{prefix}.lora_A.weight"] = m.down
    out[f"{prefix}.lora_B.weight"] = m.up
    if m.bias is not None:
        out[f"{prefix}.lora_B.bias"] = m.bias
    if m.dora is not None:
        out[f"{prefix}.lora_magnitude_vector"] = peft_magnitude(m)


def encode_diffusers(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    per: dict[str, list[LoraModule]] = {}
    for module in adapter.modules.values():
        m = _lora_only(module, "diffusers")
        _factor_keys(f"{m.component}.{_path(m, 'diffusers')}", m, out)
        per.setdefault(m.component, []).append(m)
    meta: dict[str, object] = {}
    for comp, mods in per.items():
        for k, v in build_config(mods).items():
            meta[f"{comp}.{k}"] = v
    return out, {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}


PEFT_DEFAULTS = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
                 "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "task_type": None,
                 "base_model_name_or_path": None, "layers_to_transform": None, "layers_pattern": None}


def encode_peft_component(modules: list[Module], base_model: str = "unknown", clip_layout: str = "auto",
                          embeddings: Collection[str] = (), config: Mapping[str, object] | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """One peft model's tensors and config. A peft folder binds to a concrete model's module names (peft
    reports every key missing otherwise), so text-encoder keys follow ``names.peft_text_encoder_path``
    (``clip_layout``: auto/flat/nested); kohya and diffusers files always write ``text_model.``.
    Modules whose key is in ``embeddings`` are embedding layers (weight ``[num, dim]``): written in
    peft's embedding layout; ``config`` sets adapter_config fields (``task_type``, …) over the defaults."""
    out: dict[str, torch.Tensor] = {}
    loras = [_lora_only(m, "peft") for m in modules]
    paths = [m.path for m in loras]
    for m in loras:
        path = _path(m, "peft")
        if m.component.startswith("text_encoder"):
            path = names.peft_text_encoder_path(path, base_model, m.component, paths, clip_layout)
        if m.key in embeddings:
            _embedding_keys(f"base_model.model.{path}", m, out)
        else:
            _factor_keys(f"base_model.model.{path}", m, out)
    return out, {**PEFT_DEFAULTS, **build_config(loras), **(config or {})}


def _embedding_keys(prefix: str, m: LoraModule, out: dict[str, torch.Tensor]) -> None:
    """peft's embedding LoRA: ``ΔW [num, dim] = (B·A)ᵀ·scale`` with ``A [r, num]``, ``B [dim, r]`` — the
    canonical factors transposed (``A = upᵀ``, ``B = downᵀ``); no bias or DoRA there."""
    if m.bias is not None or m.dora is not None or m.down.dim() != 2:
        raise LoraToolError(f"{m.key}: peft's embedding layout holds a plain 2-D LoRA only")
    out[f"{prefix}.lora_embedding_A"] = m.up.T.contiguous()
    out[f"{prefix}.lora_embedding_B"] = m.down.T.contiguous()


def encode_peft(adapter: Adapter, clip_layout: str = "auto", embeddings: Collection[str] = (),
                config: Mapping[str, object] | None = None
                ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, object]]]:
    """component -> (tensors, adapter_config) — one peft folder per adapted model (``embeddings`` and
    ``config``: see :func:`encode_peft_component`)."""
    per: dict[str, list[Module]] = {}
    for m in adapter.modules.values():
        per.setdefault(m.component, []).append(m)
    return {comp: encode_peft_component(mods, adapter.base_model, clip_layout, embeddings, config)
            for comp, mods in per.items()}


def encode_aitoolkit(adapter: Adapter) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        m = fold_scale(_lora_only(module, "ai-toolkit"))
        _factor_keys(f"{m.component}.{_path(m, 'ai-toolkit')}", m, out)
    return out


def encode_bfl(adapter: Adapter) -> dict[str, torch.Tensor]:
    """BFL names under ``diffusion_model.``: LoRA as ``lora_A``/``lora_B`` with the scale folded in;
    LyCORIS kinds (LoKr, LoHa, full, norm) with their own suffixes and alpha, as ComfyUI reads them."""
    from loratool.formats.build import lycoris_group
    from loratool.formats.kohya import KOHYA_SUFFIX, alpha_tensor, kohya_alpha

    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        if module.component != "transformer":
            raise LoraToolError(f"{module.key}: the BFL layout holds the Flux transformer only")
        bfl = names.diffusers_to_bfl(module.path)
        if bfl is None:
            raise LoraToolError(f"{module.key} has no BFL name (BFL stores q/k/v fused): fuse it first")
        rows = swapped(module, "flux")
        if isinstance(module, LoraModule):
            m = fold_scale(_lora_only(module, "BFL"))
            if rows:
                m = LoraModule(m.component, m.path, down=m.down, up=swap_halves(m.up), dora=m.dora,
                               bias=None if m.bias is None else swap_halves(m.bias))
            _factor_keys(f"diffusion_model.{bfl}", m, out)
            continue
        if rows:
            raise LoraToolError(f"{module.key}: a {module.kind} module over swapped modulation rows has no BFL form")
        for role, tensor in lycoris_group(module).items():
            out[f"diffusion_model.{bfl}.{KOHYA_SUFFIX.get(role, role)}"] = tensor
        alpha = kohya_alpha(module)
        if alpha is not None:
            out[f"diffusion_model.{bfl}.alpha"] = alpha_tensor(alpha, module.tensors()[0])
    return out
