"""Change an adapter's strength exactly: ``ΔW' = w · ΔW`` per module (optionally per LBW block).

Where the module stores an alpha that the loaders read as ``alpha / rank``, the alpha is scaled
(``|w|``) and a negative ``w`` flips the sign of one factor; the factors are otherwise untouched, so
the file keeps its precision. Where no alpha is stored (or the loaders ignore it: LoKr with both
sides whole), one factor is multiplied by ``w``. DoRA modules are refused: their strength is not
linear in ΔW and the web UIs disagree on what a multiplier means for them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from loratool.core.finite import all_finite
from loratool.core.modules import (
    Adapter,
    FullModule,
    LohaModule,
    LokrModule,
    LoraModule,
    Module,
    NormModule,
)
from loratool.errors import LoraToolError
from loratool.formats.read import require_complete
from loratool.ops.lbw import module_weights


def _times(t: torch.Tensor | None, w: float) -> torch.Tensor | None:
    """``w · t`` in ``t``'s dtype (computed in float32)."""
    return None if t is None else (t.float() * w).to(t.dtype)


def _flip(t: torch.Tensor, w: float) -> torch.Tensor:
    return -t if w < 0 else t


def scale_module(m: Module, w: float) -> Module:
    """A copy of ``m`` whose ΔW (and bias change) is ``w`` times the original."""
    if m.dora is not None:
        raise LoraToolError(f"{m.key} is a DoRA module; its strength is not a linear scale of ΔW")
    bias = _times(m.bias, w)
    if w == 1.0:
        return replace(m)
    if isinstance(m, LoraModule):
        if m.alpha is not None and w != 0.0:
            return replace(m, alpha=m.alpha * abs(w), up=_flip(m.up, w), bias=bias)
        return replace(m, up=_times(m.up, w), bias=bias)
    if isinstance(m, LohaModule):
        if m.alpha is not None and w != 0.0:
            return replace(m, alpha=m.alpha * abs(w), w1a=_flip(m.w1a, w), bias=bias)
        return replace(m, w1a=_times(m.w1a, w), bias=bias)
    if isinstance(m, LokrModule):
        if m.alpha is not None and m.rank is not None and w != 0.0:
            return replace(m, alpha=m.alpha * abs(w), w2=_flip(m.w2, w) if m.w2 is not None else None,
                           w2a=_flip(m.w2a, w) if m.w2a is not None else None, bias=bias)
        if m.w1 is not None:
            return replace(m, w1=_times(m.w1, w), bias=bias)
        return replace(m, w1a=_times(m.w1a, w), bias=bias)
    if isinstance(m, FullModule):
        return replace(m, diff=_times(m.diff, w), bias=bias)
    if isinstance(m, NormModule):
        return replace(m, w_norm=_times(m.w_norm, w), bias=bias)
    raise LoraToolError(f"{m.key}: cannot scale a module of kind {m.kind!r}")


def scale(adapter: Adapter, weight: float, lbw: str | None = None, *, arch_name: str | None = None,
          path: str | None = None) -> tuple[Adapter, dict[str, float]]:
    """``adapter`` with every module's ΔW times ``weight`` (times its block weight under ``lbw``).

    Returns the new adapter (same format, metadata, embeddings) and the weight each module got.
    """
    if weight != weight or weight in (float("inf"), float("-inf")):
        raise LoraToolError(f"scale {weight} is not a finite number", path)
    require_complete(adapter, path)
    weights = module_weights(adapter, weight, lbw, arch_name=arch_name, path=path).weights
    out = replace(adapter, modules={}, metadata=dict(adapter.metadata), unknown=list(adapter.unknown),
                  embeddings=dict(adapter.embeddings))
    for key, m in adapter.modules.items():
        out.modules[key] = _finite(scale_module(m, weights[key]), m, weights[key], path)
    return out, weights


def _finite(m: Module, was: Module, w: float, path: str | None) -> Module:
    """``m`` (``was`` scaled by ``w``) when its alpha and the tensors scaling changed are finite numbers; else
    an error naming it. A tensor passed through as it was is the writer's to check, as for every output."""
    if m.alpha is not None and not math.isfinite(m.alpha):
        raise LoraToolError(f"{m.key}: scaling by {w:g} makes alpha {m.alpha}, not a finite number", path)
    unchanged = {id(t) for t in was.tensors()}
    for t in m.tensors():
        if id(t) not in unchanged and not all_finite(t):
            raise LoraToolError(f"{m.key}: scaling by {w:g} leaves {t.dtype} values that are not finite "
                                "(out of range, or NaN in the input)", path)
    return m
