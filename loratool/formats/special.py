"""Layouts whose keys carry no module names: cloneofsimo ``lora_diffusion`` files and embeddings.

cloneofsimo "safeloras" store ``unet:N:up``/``unet:N:down`` (and ``text_encoder:N:…``) where ``N``
counts the adapted Linear layers in the order ``model.modules()`` meets them inside the target
classes the metadata names (``unet: ["GEGLU", "CrossAttention", "Attention"]``,
``text_encoder: ["CLIPAttention"]``). For SD1.x at the time (diffusers ≤ 0.11) a transformer block
registered ``attn1``, then ``ff`` (GEGLU), then ``attn2``; the UNet registered its down blocks, up
blocks, then the mid block; CLIP attention registers k, v, q, out. That order gives the canonical
name of every N, and each one is checked against the shape it must have; anything that does not fit
is listed as unknown with the reason. Token embeddings (``<s1>``: ``[768]``) become
``Adapter.embeddings``. The legacy ``.pt`` is a bare list ``[up0, down0, up1, down1, …]`` of the
UNet in the same order. Textual-inversion files hold ``emb_params`` (A1111 safetensors),
``string_to_param`` (A1111 ``.pt``) or ``clip_l``/``clip_g`` (SDXL).
"""

from __future__ import annotations

import json
from pathlib import Path

from loratool.core.modules import Adapter, LoraModule
from loratool.formats.detect import CLONEOFSIMO, detect_base_model, embedding_base
from loratool.formats.source import RawSource

# SD1.x transformer blocks in registration order: (prefix, width)
_SD1_BLOCKS = ([(f"down_blocks.{b}.attentions.{a}", w) for b, w in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)]
               + [(f"up_blocks.{b}.attentions.{a}", w) for b, w in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
               + [("mid_block.attentions.0", 1280)])
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def _unet_order(targets: list[str], context: int = 768) -> list[tuple[str, tuple[int, int]]]:
    """Canonical unet paths in cloneofsimo's N order, with their (out, in) shapes."""
    geglu = "GEGLU" in targets
    out = []
    for prefix, w in _SD1_BLOCKS:
        block = f"{prefix}.transformer_blocks.0"
        out += [(f"{block}.attn1.{p}", (w, w)) for p in _ATTN]
        if geglu:
            out.append((f"{block}.ff.net.0.proj", (8 * w, w)))
        out += [(f"{block}.attn2.{p}", (w, context if p in ("to_k", "to_v") else w)) for p in _ATTN]
    return out


def _te_order(targets: list[str], layers: int = 12, width: int = 768) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for i in range(layers):
        base = f"text_model.encoder.layers.{i}"
        out += [(f"{base}.self_attn.{p}", (width, width)) for p in ("k_proj", "v_proj", "q_proj", "out_proj")]
        if "CLIPMLP" in targets:
            out += [(f"{base}.mlp.fc1", (4 * width, width)), (f"{base}.mlp.fc2", (width, 4 * width))]
    return out


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
    adapter.base_model = detect_base_model(adapter.modules)
    return adapter


def _context_width(pairs: dict[int, dict[str, str]], raw: RawSource) -> int:
    """The cross-attention width (768 SD1, 1024 SD2) read off the first attn2.to_k down."""
    geglu_index = 6  # attn1 x4, ff, attn2.to_q, then attn2.to_k
    entry = pairs.get(geglu_index, {})
    if "down" in entry:
        return int(raw.shapes[entry["down"]][-1])
    return 768


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
    adapter.base_model = detect_base_model(adapter.modules)
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
    adapter.base_model = embedding_base(widths, "clip_g" in adapter.embeddings)
    return adapter


def read_special(raw: RawSource, kind: str) -> Adapter:
    if kind == "cloneofsimo":
        return read_cloneofsimo(raw)
    if kind == "cloneofsimo-legacy":
        return read_legacy(raw)
    return read_embeddings(raw)
