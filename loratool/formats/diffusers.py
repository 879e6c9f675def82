"""Layouts with diffusers module names: diffusers pipeline files (today's and two older spellings), peft
folders and ai-toolkit files.

* diffusers: ``<component>.<path>.lora_A.weight`` and alpha in the ``lora_adapter_metadata`` entry
  (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``, …);
* diffusers-old (0.21): ``unet.<path>.lora.down.weight``, ``text_encoder.<path>.lora_linear_layer.down.weight``;
* diffusers-attnproc (<= 0.20): ``unet.<attention>.processor.to_q_lora.down.weight`` and the text encoders'
  ``…self_attn.to_q_lora.down.weight``: attention projections only;
* peft: ``base_model.model.<path>.lora_A.weight`` and ``adapter_config.json``, one model per folder;
  CLIP paths as the model class it is loaded into names them (``arch.naming.peft_text_encoder_path``: a
  transformers-5 CLIPTextModel has no CLIP wrapper), unlike every other layout here;
* aitoolkit (Flux): ``transformer.<diffusers path>`` without any alpha.
The old diffusers spellings and aitoolkit keep no alpha: the scale is folded into the factors (√scale on
each). DoRA is peft's ``lora_magnitude_vector`` (output axis only); a LoRA bias is ``lora_B.bias``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping

import torch

from loratool.arch import Family, family_for, naming
from loratool.arch.registry import DENOISERS
from loratool.core.modules import Adapter, LoraModule, Module
from loratool.errors import LoraToolError
from loratool.formats.build import peft_magnitude
from loratool.formats.fuse import fold_scale
from loratool.formats.keys import ATTNPROC_TEXT, ATTNPROC_UNET
from loratool.formats.layouts import LAYOUT_KEY
from loratool.formats.peftcfg import METADATA_KEY, build_config


def _lora_only(module: Module, fmt: str) -> LoraModule:
    if not isinstance(module, LoraModule):
        raise LoraToolError(f"{module.key}: a {module.kind} module cannot be written as {fmt} "
                            "(LoRA only; convert it to LoRA first)")
    if module.mid is not None:
        raise LoraToolError(f"{module.key}: a Tucker lora_mid core cannot be written as {fmt} (no such key there)")
    return module


def _path(family: Family, module: Module, fmt: str) -> str:
    spelling = family.spell("diffusers", module.component, module.path)
    if spelling is None:
        raise LoraToolError(f"{module.key} is a fused (single-file) weight: {fmt} stores q/k/v apart, split it first")
    return spelling.name


def _factor_keys(prefix: str, m: LoraModule, out: dict[str, torch.Tensor]) -> None:
    out[f"{prefix}.lora_A.weight"] = m.down
    out[f"{prefix}.lora_B.weight"] = m.up
    if m.bias is not None:
        out[f"{prefix}.lora_B.bias"] = m.bias
    if m.dora is not None:
        out[f"{prefix}.lora_magnitude_vector"] = peft_magnitude(m)


def encode_diffusers(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    per: dict[str, list[LoraModule]] = {}
    for module in adapter.modules.values():
        m = _lora_only(module, "diffusers")
        _factor_keys(f"{m.component}.{_path(family, m, 'diffusers')}", m, out)
        per.setdefault(m.component, []).append(m)
    meta: dict[str, object] = {}
    for comp, mods in per.items():
        for k, v in build_config(mods).items():
            meta[f"{comp}.{k}"] = v
    return out, {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}


PEFT_DEFAULTS = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
                 "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "task_type": None,
                 "base_model_name_or_path": None, "layers_to_transform": None, "layers_pattern": None}


def encode_peft_component(modules: list[Module], family: Family, clip_layout: str = "auto",
                          embeddings: Collection[str] = (), config: Mapping[str, object] | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """One peft model's tensors and config. A peft folder binds to a concrete model's module names (peft
    reports every key missing otherwise), so text-encoder keys follow ``naming.peft_text_encoder_path``
    (``clip_layout``: auto/flat/nested); kohya and diffusers files always write the wrapper. The config's
    ``base_model_name_or_path`` names the family's model (so that a reader can tell the family).
    Modules whose key is in ``embeddings`` are embedding layers (weight ``[num, dim]``): written in
    peft's embedding layout; ``config`` sets adapter_config fields (``task_type``, …) over the defaults."""
    out: dict[str, torch.Tensor] = {}
    loras = [_lora_only(m, "peft") for m in modules]
    paths = [m.path for m in loras]
    for m in loras:
        path = _path(family, m, "peft")
        if family.is_text_encoder(m.component) and family.model_of(m.component) != "t5":
            projection = family.with_projection(m.component) or any("text_projection" in p for p in paths)
            path = naming.peft_text_encoder_path(path, projection, clip_layout)
        if m.key in embeddings:
            _embedding_keys(f"base_model.model.{path}", m, out)
        else:
            _factor_keys(f"base_model.model.{path}", m, out)
    return out, {**PEFT_DEFAULTS, **build_config(loras), "base_model_name_or_path": family.hub, **(config or {})}


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
    family = family_of(adapter)
    per: dict[str, list[Module]] = {}
    for m in adapter.modules.values():
        per.setdefault(m.component, []).append(m)
    return {comp: encode_peft_component(mods, family, clip_layout, embeddings, config) for comp, mods in per.items()}


def encode_peft_file(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One peft model's ``adapter_model.safetensors`` (its config: :func:`encode_peft`)."""
    parts = encode_peft(adapter)
    if len(parts) != 1:
        raise LoraToolError("a peft file holds one model; this adapter has "
                            f"{', '.join(parts)}: write it as a folder with write_adapter")
    return next(iter(parts.values()))[0], {}


def encode_aitoolkit(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        m = fold_scale(_lora_only(module, "ai-toolkit"))
        _factor_keys(f"{m.component}.{_path(family, m, 'ai-toolkit')}", m, out)
    return out, {LAYOUT_KEY: "aitoolkit"}




def _plain_folded(module: Module, fmt: str) -> LoraModule:
    m = fold_scale(_lora_only(module, fmt))
    if m.dora is not None or m.bias is not None:
        raise LoraToolError(f"{module.key}: the {fmt} layout has no place for a DoRA magnitude or a bias")
    return m


def encode_diffusers_old(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers 0.21: ``unet.<path>.lora.down.weight``; text encoders ``…lora_linear_layer.down.weight``."""
    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        m = _plain_folded(module, "diffusers-old")
        text = family.is_text_encoder(m.component) and m.component not in DENOISERS
        leaf = "lora_linear_layer" if text else "lora"
        prefix = f"{m.component}.{_path(family, m, 'diffusers-old')}.{leaf}"
        out[f"{prefix}.down.weight"], out[f"{prefix}.up.weight"] = m.down, m.up
    return out, {"format": "pt"}


def attnproc_prefix(component: str, path: str) -> str | None:
    """The attention-processor key prefix of a module (``unet.<attention>.processor.to_q_lora``;
    text encoders ``text_encoder.<attention>.to_q_lora``), or None when it is no attention projection."""
    text = component.startswith("text_encoder")
    for proj, leaf in (ATTNPROC_TEXT if text else ATTNPROC_UNET).items():
        if path.endswith("." + leaf):
            owner = path[: -len(leaf) - 1]
            return f"{component}.{owner}.{'' if text else 'processor.'}{proj}_lora"
    return None


def is_attention_projection(module: Module) -> bool:
    return attnproc_prefix(module.component, module.path) is not None


def encode_attnproc(adapter: Adapter, family: Family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers <= 0.20 attention processors, with the ``unet.`` prefix current diffusers needs to load
    them: ``unet.<attention>.processor.to_q_lora.down.weight``; text encoders ``…self_attn.to_q_lora…``."""
    out: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        m = _plain_folded(module, "diffusers-attnproc")
        prefix = attnproc_prefix(m.component, _path(family, m, "diffusers-attnproc"))
        if prefix is None:
            raise LoraToolError(f"{module.key}: the diffusers-attnproc layout holds attention projections only "
                                "(to_q, to_k, to_v, to_out); --to diffusers holds every module")
        out[f"{prefix}.down.weight"], out[f"{prefix}.up.weight"] = m.down, m.up
    return out, {"format": "pt"}


def family_of(adapter: Adapter) -> Family:
    """The family an adapter's names are spelt in, at its sizes (``arch.family_for``)."""
    return family_for(adapter)
