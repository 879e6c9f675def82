"""SD1.x: the LDM UNet numbering (``ldm_unet``), and a fact that only one old layout needs: the order in
which cloneofsimo's ``lora_diffusion`` numbered the Linear layers it adapted (``unet:N:up``).

``N`` counts the adapted layers in the order ``model.modules()`` met them inside the target classes the file's
metadata names (``unet: ["GEGLU", "CrossAttention", "Attention"]``, ``text_encoder: ["CLIPAttention"]``). For
SD1.x at the time (diffusers <= 0.11) a transformer block registered ``attn1``, then ``ff`` (GEGLU), then
``attn2``; the UNet registered its down blocks, up blocks, then the mid block; CLIP attention registers k, v,
q, out.
"""

from __future__ import annotations

from loratool.arch.families.ldm_unet import ORIGINAL_ROOTS, diffusers_to_original, original_to_diffusers

__all__ = ["ORIGINAL_ROOTS", "cloneofsimo_text_encoder_order", "cloneofsimo_unet_order", "diffusers_to_original",
           "original_to_diffusers"]

# SD1.x transformer blocks in registration order: (prefix, width)
_BLOCKS = ([(f"down_blocks.{b}.attentions.{a}", w) for b, w in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)]
           + [(f"up_blocks.{b}.attentions.{a}", w) for b, w in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
           + [("mid_block.attentions.0", 1280)])
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
CROSS_ATTENTION_K = 6  # attn1 x4, ff, attn2.to_q, then attn2.to_k: its down gives the context width


def cloneofsimo_unet_order(targets: list[str], context: int = 768) -> list[tuple[str, tuple[int, int]]]:
    """Canonical unet paths in cloneofsimo's N order, with their (out, in) shapes."""
    geglu = "GEGLU" in targets
    out = []
    for prefix, w in _BLOCKS:
        block = f"{prefix}.transformer_blocks.0"
        out += [(f"{block}.attn1.{p}", (w, w)) for p in _ATTN]
        if geglu:
            out.append((f"{block}.ff.net.0.proj", (8 * w, w)))
        out += [(f"{block}.attn2.{p}", (w, context if p in ("to_k", "to_v") else w)) for p in _ATTN]
    return out


def cloneofsimo_text_encoder_order(targets: list[str], layers: int = 12, width: int = 768
                                   ) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for i in range(layers):
        base = f"text_model.encoder.layers.{i}"
        out += [(f"{base}.self_attn.{p}", (width, width)) for p in ("k_proj", "v_proj", "q_proj", "out_proj")]
        if "CLIPMLP" in targets:
            out += [(f"{base}.mlp.fc1", (4 * width, width)), (f"{base}.mlp.fc2", (width, 4 * width))]
    return out
