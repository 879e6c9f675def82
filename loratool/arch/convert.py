"""Move tensors between a single-file checkpoint and diffusers component folders, using an Arch's map.

A checkpoint tensor holds one or more diffusers tensors: a fused qkv / linear1 / OpenCLIP in_proj holds
several row ranges; BFL/MMDiT final modulations hold their two halves in the other order; VAE attention
weights carry two trailing 1-dims; OpenCLIP's text_projection is stored transposed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from loratool.arch.table import Arch, ParamSpec
from loratool.errors import LoraToolError


def _to_diffusers(p: ParamSpec, tensor: torch.Tensor) -> torch.Tensor:
    if p.op == "T":
        tensor = tensor.t()
    elif p.op == "conv1x1":
        tensor = tensor.reshape(tensor.shape[:2])
    if p.rows is not None:
        tensor = torch.cat([tensor[a:b] for a, b in p.rows]) if len(p.rows) > 1 else tensor[slice(*p.rows[0])]
    return tensor


def _scaled(p: ParamSpec, rows: int, table_rows: int) -> ParamSpec:
    """`p` with its row ranges scaled from the table's first dim to `rows` (a fused tensor of other widths)."""
    if p.rows is None or rows == table_rows:
        return p
    if any(a * rows % table_rows or b * rows % table_rows for a, b in p.rows):
        raise LoraToolError(f"{p.checkpoint_key} has {rows} rows, which do not split as {table_rows} do")
    return replace(p, rows=tuple((a * rows // table_rows, b * rows // table_rows) for a, b in p.rows))


def checkpoint_to_diffusers(arch: Arch, key: str, tensor: torch.Tensor,
                            table_shapes: bool = True) -> list[tuple[ParamSpec, torch.Tensor]]:
    """The diffusers tensors inside single-file tensor `key` (views where possible).

    With table_shapes=False the widths are not the table's (a model built from a config, which the caller
    checks the results against): only the number of dims is checked, and fused row ranges are scaled."""
    params = arch.checkpoint_params.get(key)
    if not params:
        raise LoraToolError(f"{key} is not a {arch.name} checkpoint key")
    want = arch.checkpoint_shape(key)
    shape = tuple(tensor.shape)
    if table_shapes and shape != want:
        raise LoraToolError(f"{key} has shape {list(shape)}, {arch.name} expects {list(want)}")
    if not table_shapes:
        if len(shape) != len(want) or (params[0].op == "conv1x1" and shape[2:] != (1, 1)):
            raise LoraToolError(f"{key} has shape {list(shape)}, {arch.name} stores {len(want)} dims"
                                + (" ending in 1x1" if params[0].op == "conv1x1" else ""))
        params = [_scaled(p, shape[0], want[0]) for p in params]
    return [(p, _to_diffusers(p, tensor)) for p in params]


def diffusers_to_checkpoint(arch: Arch, key: str, get: Callable[[ParamSpec], torch.Tensor]) -> torch.Tensor:
    """Build single-file tensor `key` from its diffusers tensors (`get` returns one per ParamSpec)."""
    params = arch.checkpoint_params.get(key)
    if not params:
        raise LoraToolError(f"{key} is not a {arch.name} checkpoint key")
    first = params[0]
    if first.rows is None:
        tensor = get(first)
        if first.op == "T":
            return tensor.t().contiguous()
        return tensor.reshape(*tensor.shape, 1, 1) if first.op == "conv1x1" else tensor
    if len(first.rows) > 1:  # a permutation of one tensor's rows
        tensor = get(first)
        out = torch.empty_like(tensor)
        start = 0
        for a, b in first.rows:
            out[a:b] = tensor[start:start + b - a]
            start += b - a
        return out
    pieces = sorted(((p.rows[0], get(p)) for p in params), key=lambda x: x[0][0])
    return torch.cat([t for _, t in pieces])
