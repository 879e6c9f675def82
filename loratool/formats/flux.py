"""Flux specifics of reading and writing: XLabs single-block q/k/v, the BFL final modulation's row order.

BFL's ``final_layer.adaLN_modulation.1`` produces ``[shift, scale]`` where diffusers' ``norm_out.linear``
produces ``[scale, shift]``: its up rows (and bias) are swapped in halves when the name changes. XLabs
single blocks train one ``qkv_lora`` over the q/k/v rows of ``linear1`` (not the MLP rows): it is read as
three diffusers modules sharing one down (exact).
"""

from __future__ import annotations

import re

import torch

from loratool.core.modules import Adapter, LoraModule
from loratool.formats.fuse import split_lora

_XLABS_SINGLE = re.compile(r"single_transformer_blocks\.(\d+)\.attn\.to_qkv$")


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Rows ``[a, b]`` -> ``[b, a]`` (exact; an involution)."""
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def finish_read(adapter: Adapter) -> None:
    for key, m in list(adapter.modules.items()):
        match = _XLABS_SINGLE.match(m.path) if m.component == "transformer" else None
        if match is None or not isinstance(m, LoraModule):
            continue
        width = m.up.shape[0] // 3
        base = f"transformer.single_transformer_blocks.{match.group(1)}.attn."
        parts = [(base + name, (i * width, (i + 1) * width)) for i, name in enumerate(("to_q", "to_k", "to_v"))]
        del adapter.modules[key]
        for part in split_lora(m, parts):
            adapter.add(part)
