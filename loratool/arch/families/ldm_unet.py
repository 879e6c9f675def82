"""SD1 / SD2 / SDXL UNets: LDM/SGM block numbering (``input_blocks.4.1``) <-> diffusers (``down_blocks.1.attentions.0``).

The numbering is arithmetic: every down/up block holds ``layers_per_block`` (+1 on the way up) sub-blocks,
counted through in one sequence, with resnets at sub-index 0 and attentions at 1. The tables
(``data/tables/sd*.json``) list every module of the three released UNets; these functions name the modules of
UNets the tables do not list (other widths or depths built in the same block structure), and
tools/gen_arch_tables.py builds the tables with them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_RESNET_LDM = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
               "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_RESNET_DIFFUSERS = {v: k for k, v in _RESNET_LDM.items()}
_GLOBAL_LDM = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_GLOBAL_DIFFUSERS = {v: k for k, v in _GLOBAL_LDM.items()}
ORIGINAL_ROOTS = frozenset({"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"})


def _renamed(table: dict[str, str], path: str) -> str | None:
    """``path`` with its leading name renamed by ``table`` (None when no entry leads it)."""
    for a, b in table.items():
        if path == a or path.startswith(a + "."):
            return b + path[len(a):]
    return None


def _sub(table: dict[str, str], rest: str) -> str:
    return _renamed(table, rest) or rest


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if b else a


def original_to_diffusers(path: str, layers_per_block: int = 2) -> str | None:
    """An LDM/SGM UNet module path in diffusers names (None: not an LDM path)."""
    if path.split(".", 1)[0] not in ORIGINAL_ROOTS:
        return None
    fixed = _renamed(_GLOBAL_LDM, path)
    if fixed is not None:
        return fixed
    step = layers_per_block + 1
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        down, i, j, rest = m.group(1) == "input_blocks", int(m.group(2)), int(m.group(3)), m.group(4) or ""
        block, layer = divmod(i - 1 if down else i, step)
        if down and rest.startswith("op"):
            return _join(f"down_blocks.{block}.downsamplers.0.conv", rest[2:].lstrip("."))
        if not down and j > 0 and (rest == "conv" or rest.startswith("conv.")):
            return _join(f"up_blocks.{block}.upsamplers.0.conv", rest[4:].lstrip("."))
        if j == 0:
            return _join(f"{'down' if down else 'up'}_blocks.{block}.resnets.{layer}", _sub(_RESNET_LDM, rest))
        return _join(f"{'down' if down else 'up'}_blocks.{block}.attentions.{layer}", rest)
    m = re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        j, rest = int(m.group(1)), m.group(2) or ""
        if j == 1:
            return _join("mid_block.attentions.0", rest)
        return _join(f"mid_block.resnets.{j // 2}", _sub(_RESNET_LDM, rest))
    return None


def diffusers_to_original(path: str, layers_per_block: int = 2, up_has_attn: Sequence[bool] | None = None) -> str:
    """The inverse of :func:`original_to_diffusers`. An up block's upsampler sits at sub-index 2 after an
    attention, else at 1 (``up_has_attn`` per up block; SDXL's layout, index 2, when not given)."""
    fixed = _renamed(_GLOBAL_DIFFUSERS, path)
    if fixed is not None:
        return fixed
    step = layers_per_block + 1
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        side, i, sub, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if sub == "downsamplers":
            return _join(f"input_blocks.{step * (i + 1)}.0.op", rest[4:].lstrip(".") if rest.startswith("conv") else rest)
        if sub == "upsamplers":
            index = 2 if up_has_attn is None or up_has_attn[i] else 1
            return _join(f"output_blocks.{step * i + layers_per_block}.{index}", rest)
        if sub == "resnets":
            rest = _sub(_RESNET_DIFFUSERS, rest)
        idx = step * i + j + 1 if side == "down" else step * i + j
        return _join(f"{'input' if side == 'down' else 'output'}_blocks.{idx}.{0 if sub == 'resnets' else 1}", rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        sub, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if sub == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{2 * j}", _sub(_RESNET_DIFFUSERS, rest))
    return path
