"""Layouts whose keys carry no module names: cloneofsimo ``lora_diffusion`` files (read only) and embeddings.

cloneofsimo "safeloras" store ``unet:N:up``/``unet:N:down`` (and ``text_encoder:N:…``) where ``N``
counts the adapted Linear layers in the order the model met them inside the target classes the metadata
names; that order is an SD1.x fact (``loratool.arch.families.sd1``). It gives the canonical name of
every N, and each one is checked against the shape it must have; anything that does not fit is listed
as unknown with the reason. Token embeddings (``<s1>``: ``[768]``) become
``Adapter.embeddings``. The legacy ``.pt`` is a bare list ``[up0, down0, up1, down1, …]`` of the
UNet in the same order. Textual-inversion files hold ``emb_params`` (A1111 safetensors),
``string_to_param`` (A1111 ``.pt``) or ``clip_l``/``clip_g`` (SDXL).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loratool.arch.detect import detect_embeddings
from loratool.arch.registry import naming_function
from loratool.core.modules import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.formats.detect import CLONEOFSIMO
from loratool.formats.source import RawSource


def _unet_order(targets: list[str], context: int = 768) -> list[tuple[str, tuple[int, int]]]:
    order = naming_function("cloneofsimo_unet_order")
    return order(targets, context) if order is not None else []


def _te_order(targets: list[str]) -> list[tuple[str, tuple[int, int]]]:
    order = naming_function("cloneofsimo_text_encoder_order")
    return order(targets) if order is not None else []


def _targets(metadata: dict[str, str], component: str, default: list[str]) -> list[str]:
    try:
        value = json.loads(metadata.get(component, ""))
        return [str(v) for v in value] if isinstance(value, list) else default
    except ValueError:
        return default


def _place_pairs(adapter: Adapter, component: str, pairs: dict[int, dict[str, str]], raw: RawSource,
                 order: list[tuple[str, tuple[int, int]]]) -> None:
    for n in sorted(pairs):
        keys = pairs[n]
        if n >= len(order):
            _unknown(adapter, keys.values(), f"{component} index {n} is beyond the {len(order)} layers "
                     "cloneofsimo's SD1.x order has")
            continue
        if set(keys) != {"up", "down"}:
            _unknown(adapter, keys.values(), f"{component} index {n} lacks its {'up' if 'down' in keys else 'down'}")
            continue
        path, (out, inp) = order[n]
        up, down = raw.get(keys["up"]), raw.get(keys["down"])
        if up.shape[0] != out or down.shape[-1] != inp:
            _unknown(adapter, keys.values(), f"{component} index {n} has shape {tuple(up.shape[:1])}x"
                     f"{tuple(down.shape[1:])}, expected {out}x{inp} for {path}: the SD1.x order does not fit")
            continue
        adapter.add(LoraModule(component, path, down=down, up=up))


def _unknown(adapter: Adapter, keys, reason: str) -> None:
    for k in keys:
        adapter.unknown.append(k)
        adapter.unknown_reasons[k] = reason


def read_cloneofsimo(raw: RawSource) -> Adapter:
    adapter = Adapter(source_format="cloneofsimo")
    pairs: dict[str, dict[int, dict[str, str]]] = {}
    for key in raw.shapes:
        m = CLONEOFSIMO.match(key)
        if m:
            pairs.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = key
        elif raw.metadata.get(key) == "<embed>" or len(raw.shapes[key]) == 1:
            t = raw.get(key)
            adapter.embeddings[key] = t.reshape(1, -1) if t.dim() == 1 else t
        else:
            _unknown(adapter, [key], "not a cloneofsimo LoRA or embedding key")
    if "unet" in pairs:
        context = _context_width(pairs["unet"], raw)
        order = _unet_order(_targets(raw.metadata, "unet", ["CrossAttention", "Attention", "GEGLU"]), context)
        _place_pairs(adapter, "unet", pairs["unet"], raw, order)
    for comp in ("text_encoder", "text_encoder_2"):
        if comp in pairs:
            _place_pairs(adapter, comp, pairs[comp], raw, _te_order(_targets(raw.metadata, comp, ["CLIPAttention"])))
    return adapter


def _context_width(pairs: dict[int, dict[str, str]], raw: RawSource) -> int:
    """The cross-attention width (768 SD1, 1024 SD2) read off the first attn2.to_k down."""
    entry = pairs.get(_cross_attention_index(), {})
    if "down" in entry:
        return int(raw.shapes[entry["down"]][-1])
    return 768


def _cross_attention_index() -> int:
    """The N of the first cross-attention to_k in cloneofsimo's order (its down gives the context width)."""
    order = _unet_order(["GEGLU"])
    return next((i for i, (path, _) in enumerate(order) if path.endswith("attn2.to_k")), 0)


def read_legacy(raw: RawSource) -> Adapter:
    """cloneofsimo's bare list ``[up0, down0, up1, down1, ...]`` of the UNet."""
    adapter = Adapter(source_format="cloneofsimo")
    keys = sorted(raw.shapes, key=int)
    pairs = {i // 2: {"up": keys[i], "down": keys[i + 1]} for i in range(0, len(keys) - 1, 2)}
    if len(keys) % 2:
        _unknown(adapter, [keys[-1]], "odd tensor count: an up without its down")
    widths = {raw.shapes[k][-1] for k in keys}
    if widths <= {768}:
        _place_pairs(adapter, "text_encoder", pairs, raw, _te_order(["CLIPAttention"]))
    else:
        geglu = len(pairs) == len(_unet_order(["GEGLU"]))
        _place_pairs(adapter, "unet", pairs, raw, _unet_order(["GEGLU"] if geglu else []))
    return adapter


def read_embeddings(raw: RawSource) -> Adapter:
    adapter = Adapter(source_format="textual-inversion")
    token = raw.metadata.get("name") or Path(raw.path).stem
    for key in raw.shapes:
        t = raw.get(key)
        if key in ("clip_l", "clip_g"):
            adapter.embeddings[key] = t
        elif key == "emb_params" or key.startswith("string_to_param."):
            adapter.embeddings[token] = t.reshape(1, -1) if t.dim() == 1 else t
        elif not key.startswith(("string_to_token", "step", "sd_checkpoint")):
            _unknown(adapter, [key], "not a textual-inversion tensor")
    widths = [int(t.shape[-1]) for t in adapter.embeddings.values()]
    adapter.detection = detect_embeddings(adapter.embeddings, widths, raw.metadata)
    adapter.base_model = adapter.detection.family
    return adapter


def encode_embeddings(adapter: Adapter, family) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A textual-inversion file: SDXL's ``clip_l``/``clip_g`` pair as it is, else one token's ``emb_params``."""
    if adapter.modules:
        raise LoraToolError(f"{len(adapter.modules)} LoRA module(s): a textual-inversion file holds token "
                            "embeddings only (convert writes them beside a LoRA output)")
    pair = {k: v for k, v in adapter.embeddings.items() if k in ("clip_l", "clip_g")}
    if pair:
        return {k: v.contiguous() for k, v in pair.items()}, {}
    if len(adapter.embeddings) != 1:
        raise LoraToolError(f"a textual-inversion file holds one token; this adapter has {len(adapter.embeddings)}")
    token, emb = next(iter(adapter.embeddings.items()))
    return {"emb_params": (emb.reshape(1, -1) if emb.dim() == 1 else emb).contiguous()}, {"name": token}


def read_special(raw: RawSource, kind: str) -> Adapter:
    if kind == "cloneofsimo":
        return read_cloneofsimo(raw)
    if kind == "cloneofsimo-legacy":
        return read_legacy(raw)
    return read_embeddings(raw)
