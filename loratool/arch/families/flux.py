"""FLUX.1: BFL checkpoint names (``double_blocks.N.img_attn.qkv``) <-> diffusers names, and XLabs' LoRA names.

BFL stores q/k/v fused (``img_attn.qkv``, ``txt_attn.qkv``) and a single block's q/k/v and MLP input as one
``linear1``; the canonical names of those fused weights are the table's pseudo-modules (``attn.to_qkv``,
``attn.to_added_qkv``, ``to_qkv_mlp``). ``final_layer.adaLN_modulation.1`` holds ``[shift, scale]`` where
diffusers' ``norm_out.linear`` holds ``[scale, shift]`` (the table records that row order).

XLabs LoRAs (``double_blocks.N.processor.qkv_lora1.down.weight``) name a double block's image stream ``1``
and its text stream ``2``; a single block's ``qkv_lora`` covers only the q/k/v rows of ``linear1``.
"""

from __future__ import annotations

import re

_DOUBLE = {
    "img_attn.qkv": "attn.to_qkv", "txt_attn.qkv": "attn.to_added_qkv",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
}
_SINGLE = {"linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear"}
_GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_DOUBLE_INV = {v: k for k, v in _DOUBLE.items()}
_SINGLE_INV = {v: k for k, v in _SINGLE.items()}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
ORIGINAL_ROOTS = frozenset({"double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                            "final_layer"})
SWAPPED = frozenset({"norm_out.linear"})  # diffusers paths whose BFL weight holds its row halves swapped


def original_to_diffusers(path: str) -> str | None:
    """A BFL module path in diffusers names (None: BFL has no such module)."""
    m = re.match(r"(double|single)_blocks\.(\d+)\.(.*)$", path)
    if m:
        double = m.group(1) == "double"
        name = (_DOUBLE if double else _SINGLE).get(m.group(3))
        block = "transformer_blocks" if double else "single_transformer_blocks"
        return None if name is None else f"{block}.{m.group(2)}.{name}"
    return _GLOBAL.get(path)


def diffusers_to_original(path: str) -> str | None:
    """A diffusers path in BFL names; None when BFL has no weight of that name (split q/k/v)."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)$", path)
    if m:
        double = m.group(1) == "transformer_blocks"
        name = (_DOUBLE_INV if double else _SINGLE_INV).get(m.group(3))
        return None if name is None else f"{'double' if double else 'single'}_blocks.{m.group(2)}.{name}"
    return _GLOBAL_INV.get(path)


_XLABS = re.compile(r"(double|single)_blocks\.(\d+)\.(qkv|proj)(\d?)$")


def xlabs_to_diffusers(name: str) -> str | None:
    """An XLabs module name (``double_blocks.1.qkv2``: block, projection and stream) in diffusers names.
    A single block's ``qkv`` is the q/k/v part of ``linear1``: see :func:`xlabs_parts`."""
    m = _XLABS.match(name)
    if m is None:
        return None
    kind, n, proj, stream = m.groups()
    if kind == "double":
        side = "img" if stream in ("1", "") else "txt"
        return original_to_diffusers(f"double_blocks.{n}.{side}_attn.{proj}")
    return f"single_transformer_blocks.{n}.{'attn.to_qkv' if proj == 'qkv' else 'proj_out'}"


def diffusers_to_xlabs(path: str) -> str | None:
    """The inverse of :func:`xlabs_to_diffusers`."""
    m = re.match(r"single_transformer_blocks\.(\d+)\.(attn\.to_qkv|proj_out)$", path)
    if m:
        return f"single_blocks.{m.group(1)}.{'qkv' if m.group(2) == 'attn.to_qkv' else 'proj'}"
    bfl = diffusers_to_original(path)
    m = re.match(r"double_blocks\.(\d+)\.(img|txt)_attn\.(qkv|proj)$", bfl or "")
    return None if m is None else f"double_blocks.{m.group(1)}.{m.group(3)}{1 if m.group(2) == 'img' else 2}"


def xlabs_parts(path: str, rows: int) -> list[tuple[str, tuple[int, int]]] | None:
    """The split modules of an XLabs single-block ``attn.to_qkv`` of ``rows`` rows (q, k, v alike), else None."""
    m = re.match(r"single_transformer_blocks\.(\d+)\.attn\.to_qkv$", path)
    if m is None or rows % 3:
        return None
    width = rows // 3
    base = f"single_transformer_blocks.{m.group(1)}.attn."
    return [(base + leaf, (i * width, (i + 1) * width)) for i, leaf in enumerate(("to_q", "to_k", "to_v"))]
