"""SD3 / SD3.5: SAI MMDiT names (``joint_blocks.N.x_block.attn.qkv``) <-> diffusers names.

Each joint block has an image stream (``x_block``) and a text stream (``context_block``), each with a fused
``attn.qkv`` (canonical pseudo-modules ``attn.to_qkv`` and ``attn.to_added_qkv``, split at multiples of the
hidden size). The table lists SD3 Medium's 24 blocks; these rules name the blocks of deeper models (SD3.5
Large: 38) the same way. Only the table knows that the last block's text-stream modulation is stored with
its row halves swapped (a pre-only block has diffusers' continuous AdaLayerNorm there).
"""

from __future__ import annotations

import re

_BLOCK = {
    "x_block.attn.qkv": "attn.to_qkv", "context_block.attn.qkv": "attn.to_added_qkv",
    "x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
    "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
    "x_block.adaLN_modulation.1": "norm1.linear", "context_block.adaLN_modulation.1": "norm1_context.linear",
}
_GLOBAL = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder", "final_layer.linear": "proj_out",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
ORIGINAL_ROOTS = frozenset({"joint_blocks", "x_embedder", "context_embedder", "final_layer", "t_embedder",
                            "y_embedder"})


def original_to_diffusers(path: str) -> str | None:
    m = re.match(r"joint_blocks\.(\d+)\.(.*)$", path)
    if m:
        name = _BLOCK.get(m.group(2))
        return None if name is None else f"transformer_blocks.{m.group(1)}.{name}"
    return _GLOBAL.get(path)


def diffusers_to_original(path: str) -> str | None:
    m = re.match(r"transformer_blocks\.(\d+)\.(.*)$", path)
    if m:
        name = _BLOCK_INV.get(m.group(2))
        return None if name is None else f"joint_blocks.{m.group(1)}.{name}"
    return _GLOBAL_INV.get(path)
