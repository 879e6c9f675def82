"""FLUX.1's own layout: XLabs' LoRA names. (BFL <-> diffusers renames are data: the entry's ``renames``; BFL
stores q/k/v fused, whose canonical names are the table's pseudo-modules ``attn.to_qkv``, ``attn.to_added_qkv``
and ``to_qkv_mlp``.)

XLabs LoRAs (``double_blocks.N.processor.qkv_lora1.down.weight``) name a double block's image stream ``1``
and its text stream ``2``; a single block's ``qkv_lora`` covers only the q/k/v rows of ``linear1``.
"""

from __future__ import annotations

import re

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
        return _bfl().original_to_diffusers(f"double_blocks.{n}.{side}_attn.{proj}")
    return f"single_transformer_blocks.{n}.{'attn.to_qkv' if proj == 'qkv' else 'proj_out'}"


def diffusers_to_xlabs(path: str) -> str | None:
    """The inverse of :func:`xlabs_to_diffusers`."""
    m = re.match(r"single_transformer_blocks\.(\d+)\.(attn\.to_qkv|proj_out)$", path)
    if m:
        return f"single_blocks.{m.group(1)}.{'qkv' if m.group(2) == 'attn.to_qkv' else 'proj'}"
    bfl = _bfl().diffusers_to_original(path)
    m = re.match(r"double_blocks\.(\d+)\.(img|txt)_attn\.(qkv|proj)$", bfl or "")
    return None if m is None else f"double_blocks.{m.group(1)}.{m.group(3)}{1 if m.group(2) == 'img' else 2}"


def _bfl():
    from loratool.arch.registry import family

    return family("flux").naming


def xlabs_parts(path: str, rows: int) -> list[tuple[str, tuple[int, int]]] | None:
    """The split modules of an XLabs single-block ``attn.to_qkv`` of ``rows`` rows (q, k, v alike), else None."""
    m = re.match(r"single_transformer_blocks\.(\d+)\.attn\.to_qkv$", path)
    if m is None or rows % 3:
        return None
    width = rows // 3
    base = f"single_transformer_blocks.{m.group(1)}.attn."
    return [(base + leaf, (i * width, (i + 1) * width)) for i, leaf in enumerate(("to_q", "to_k", "to_v"))]
