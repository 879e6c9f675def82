"""Move tensors between a single-file checkpoint and diffusers component folders, using an Arch's map.

A checkpoint tensor holds one or more diffusers tensors: a fused qkv / linear1 / OpenCLIP in_proj holds
several row ranges; BFL/MMDiT final modulations hold their two halves in the other order; VAE attention
weights carry two trailing 1-dims; OpenCLIP's text_projection is stored transposed.
"""

from __future__ import annotations

from collections.abc import Callable

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


def checkpoint_to_diffusers(arch: Arch, key: str, tensor: torch.Tensor) -> list[tuple[ParamSpec, torch.Tensor]]:
    """The diffusers tensors inside single-file tensor `key` (views where possible)."""
    params = arch.checkpoint_params.get(key)
    if not params:
        raise LoraToolError(f"{key} is not a {arch.name} checkpoint key")
    want = arch.checkpoint_shape(key)
    if tuple(tensor.shape) != want:
        raise LoraToolError(f"{key} has shape {list(tensor.shape)}, {arch.name} expects {list(want)}")
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
