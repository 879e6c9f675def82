"""Exact fuse and split of LoRA factors for weights that one layout stores fused and another split.

Flux's BFL checkpoint stores q, k, v (and the single blocks' MLP input) as one ``qkv``/``linear1``
weight; diffusers stores them apart. For LoRA factors both directions are exact:

* fuse: stack the downs ``[Σr, in]`` and put the ups on a block diagonal ``[Σout, Σr]``
  (or, when every part shares one down tensor, keep that down and stack the ups);
* split: a block-diagonal up (rank divisible by the part count, off-diagonal blocks exactly zero)
  is cut into its blocks with the matching chunk of the down; any other up keeps the whole down
  (shared, not copied) and gives each part its rows.

The values of the factors are never changed; only the scale may need one multiplication when the
parts' scales differ (fusing parts at different alpha/r), which is then folded into the ups.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from loratool.core.modules import LoraModule
from loratool.errors import LoraToolError

Rows = tuple[int, int]


def _check_plain(m: LoraModule) -> None:
    if m.mid is not None or m.dora is not None or m.down.dim() != 2:
        raise LoraToolError(f"{m.key}: only plain linear LoRA factors (no Tucker core, no DoRA) can be fused/split")


def fuse_lora(parts: list[LoraModule], component: str, path: str) -> LoraModule:
    """One LoRA over the row-concatenation of ``parts`` (in order) with identical ΔW per part."""
    if not parts:
        raise LoraToolError(f"{component}.{path}: nothing to fuse")
    for m in parts:
        _check_plain(m)
    scales = [m.scale for m in parts]
    dtype = parts[0].up.dtype
    shared = all(m.down is parts[0].down or torch.equal(m.down, parts[0].down) for m in parts[1:])
    if shared and len(set(scales)) == 1:
        up = torch.cat([m.up for m in parts], dim=0)
        return LoraModule(component, path, alpha=_alpha_for(parts[0], parts[0].rank), down=parts[0].down, up=up,
                          rslora=parts[0].rslora if parts[0].alpha is not None else False)
    rank = sum(m.rank for m in parts)
    out = sum(m.up.shape[0] for m in parts)
    down = torch.cat([m.down for m in parts], dim=0)
    up = torch.zeros(out, rank, dtype=dtype)
    target = scales[0]
    row = col = 0
    for m, s in zip(parts, scales, strict=False):
        block = m.up if s == target else (m.up.double() * (s / target)).to(dtype)
        up[row:row + m.up.shape[0], col:col + m.rank] = block
        row += m.up.shape[0]
        col += m.rank
    return LoraModule(component, path, alpha=target * rank, down=down, up=up)


def _alpha_for(m: LoraModule, rank: int) -> float | None:
    return m.alpha


def block_diagonal_ranks(up: torch.Tensor, rows: list[Rows]) -> list[Rows] | None:
    """The rank column range of each part when ``up`` is block-diagonal over ``rows``, else None."""
    n = len(rows)
    r = up.shape[1]
    if r % n:
        return None
    step = r // n
    cols = [(i * step, (i + 1) * step) for i in range(n)]
    for (r0, r1), (c0, c1) in zip(rows, cols, strict=False):
        block = up[r0:r1]
        if torch.count_nonzero(block[:, :c0]) or torch.count_nonzero(block[:, c1:]):
            return None
    return cols


def split_lora(module: LoraModule, parts: list[tuple[str, Rows]]) -> list[LoraModule]:
    """The per-part LoRAs of a fused module; ``parts`` are (canonical key, (row0, row1))."""
    _check_plain(module)
    rows = [rr for _, rr in parts]
    if rows[-1][1] != module.up.shape[0]:
        raise LoraToolError(f"{module.key}: up has {module.up.shape[0]} rows, the parts cover {rows[-1][1]}")
    cols = block_diagonal_ranks(module.up, rows)
    out = []
    for (key, (r0, r1)), col in zip(parts, cols or [None] * len(parts), strict=False):
        comp, _, path = key.partition(".")
        if col is None:
            out.append(replace(module, component=comp, path=path, up=module.up[r0:r1], down=module.down, bias=None))
            continue
        c0, c1 = col
        # same scale: alpha/r for the whole becomes alpha_part/r_part with r_part = r/n
        alpha = None if module.alpha is None else module.alpha * (c1 - c0) / module.rank
        if module.rslora and alpha is not None:
            alpha = module.alpha * (c1 - c0) ** 0.5 / module.rank ** 0.5
        out.append(replace(module, component=comp, path=path, up=module.up[r0:r1, c0:c1],
                           down=module.down[c0:c1], alpha=alpha, bias=None))
    if module.bias is not None:
        for m, (_, (r0, r1)) in zip(out, parts, strict=False):
            m.bias = module.bias[r0:r1]
    return out


def fold_scale(module: LoraModule) -> LoraModule:
    """The same ΔW with alpha folded into the factors as √scale on each (for layouts without alpha)."""
    s = module.scale
    if s == 1.0 and module.alpha is None:
        return module
    if s == 1.0:
        return replace(module, alpha=None, rslora=False)
    root = abs(s) ** 0.5
    up = (module.up.double() * (root if s > 0 else -root)).to(module.up.dtype)
    down = (module.down.double() * root).to(module.down.dtype)
    bias = None if module.bias is None else (module.bias.double() * s).to(module.bias.dtype)
    return replace(module, up=up, down=down, bias=bias, alpha=None, rslora=False)
