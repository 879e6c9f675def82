"""Which architecture a single-file checkpoint or a diffusers folder belongs to, from keys and shapes."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

_CROSS = re.compile(r"(^|\.)(transformer_blocks\.0\.attn2\.to_k\.weight)$")
_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def detect_arch_from_checkpoint(
    keys_and_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
) -> str:
    """sd1 | sd2 | sdxl | flux | sd3 | unknown.

    Accepts single-file keys (LDM/SGM/BFL/MMDiT, with or without model.diffusion_model.), the keys of a
    diffusers component (unet/transformer/text encoder) or of a whole pipeline folder prefixed by the
    component name. Shapes decide between SD1/SD2/SDXL (cross-attention width 768/1024/2048)."""
    items = keys_and_shapes.items() if isinstance(keys_and_shapes, Mapping) else keys_and_shapes
    shapes = {k: tuple(s) for k, s in items}
    keys = list(shapes)

    def has(*parts: str) -> bool:
        return any(all(p in k for p in parts) for k in keys)

    if has("double_blocks.") or has("single_transformer_blocks.") or has("single_blocks.", "linear1"):
        return "flux"
    if has("joint_blocks.") or (has("transformer_blocks.", "attn.add_q_proj") and has("pos_embed")):
        return "sd3"
    for key, shape in shapes.items():  # the context width decides; 1280 is the SDXL refiner (no table)
        if _CROSS.search(key) and len(shape) == 2:
            return _WIDTH.get(shape[1], "unknown")
    if has("conditioner.embedders.") or has("label_emb.0.0.") or has("add_embedding.linear_1."):
        return "sdxl"
    if has("cond_stage_model.model.transformer.resblocks."):
        return "sd2"
    if has("cond_stage_model.transformer.text_model."):
        return "sd1"
    return _detect_text_encoder(shapes)


def _detect_text_encoder(shapes: dict[str, tuple[int, ...]]) -> str:
    """A lone CLIP text encoder: 768 wide is SD1's CLIP-L, 1024 wide is SD2's OpenCLIP-H."""
    for key, shape in shapes.items():
        if key.endswith("encoder.layers.0.self_attn.q_proj.weight") and len(shape) == 2:
            return {768: "sd1", 1024: "sd2"}.get(shape[1], "unknown")
    return "unknown"


def detect_layout_from_checkpoint(keys: Iterable[str]) -> str:
    """sd1 | sd2 | sdxl | unknown by key names alone: the one architecture whose table names every key of
    the file (its single-file keys and known extras); none, or more than one (a file of UNet keys only), is
    unknown.

    Widths play no part, so this names the layout of a file built at other widths (a tiny test model in
    SD1's block structure) or one with tensors missing; use it only where every tensor is checked against
    something else (training fills models built from a config, strictly, and names what is missing).
    Real files go through detect_arch_from_checkpoint, which reads the widths."""
    from loratool.arch import load_arch

    keys = set(keys)
    fits = []
    for name in ("sd1", "sd2", "sdxl"):
        table = load_arch(name)
        ours = keys & set(table.checkpoint_params)
        if ours and all(table.is_checkpoint_extra(k) for k in keys - ours):
            fits.append(name)
    return fits[0] if len(fits) == 1 else "unknown"
