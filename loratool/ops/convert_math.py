"""The tensor rewrites a conversion may need, one module at a time.

Exact ones (same ΔW up to float rounding): folding the scale into the factors, rsLoRA to a plain
alpha, a Tucker core folded into ``down``. The lossy one: any module to plain LoRA through a
truncated SVD of its ΔW, with the relative error it costs measured on what will be written.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from loratool.core.modules import LoraModule, Module, flat2d
from loratool.linalg import RankMode, SvdPolicy, decompose
from loratool.linalg.factored import split_singular

DEFAULT_ENERGY = 0.999  # keep this fraction of ‖ΔW‖_F when no rank is given
DEFAULT_RANK_CAP = 128


def unfold_rslora(module: LoraModule) -> LoraModule:
    """rsLoRA ``alpha/√r`` as a plain ``alpha'/r``: ``alpha' = alpha·√r`` (no tensor changes)."""
    if not module.rslora:
        return module
    alpha = None if module.alpha is None else module.alpha * math.sqrt(module.rank)
    return replace(module, alpha=alpha, rslora=False)


def fold_scale(module: LoraModule) -> LoraModule:
    """The scale moved into the factors as ``√scale`` on each (keeps fp16 in range); no alpha left.

    A scale of exactly 1 changes no tensor. The factors are rescaled in float32 and stored back in
    their own dtype.
    """
    scale = module.scale
    if scale == 1.0:
        return replace(module, alpha=None, rslora=False)
    root = math.sqrt(abs(scale))
    sign = -1.0 if scale < 0 else 1.0
    down = (module.down.to(torch.float32) * root).to(module.down.dtype)
    up = (module.up.to(torch.float32) * (root * sign)).to(module.up.dtype)
    return replace(module, down=down, up=up, alpha=None, rslora=False)


def fold_tucker(module: LoraModule) -> LoraModule:
    """A LoCon Tucker module (``up · mid · down``) as a flat LoCon with ``down' = mid ⊛ down``.

    ``down'[i, c, h, w] = Σ_j mid[i, j, h, w] · down[j, c]`` has the layer's kernel, so
    ``up @ down'`` is the same ΔW at the same rank. The alpha is rescaled when the core is not
    square, so that ``alpha / rows(down')`` stays the module's scale.
    """
    if module.mid is None:
        return module
    mid = module.mid.to(torch.float32)
    down = flat2d(module.down).to(torch.float32)
    folded = torch.einsum("ijhw,jc->ichw", mid, down).to(module.down.dtype)
    alpha = module.alpha
    if alpha is not None and not module.rslora and folded.shape[0] != module.rank:
        alpha = alpha * folded.shape[0] / module.rank
    return replace(module, down=folded, mid=None, alpha=alpha)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """‖approx − reference‖_F / ‖reference‖_F in float64 (0 for a zero reference matched exactly)."""
    ref = reference.to(torch.float64)
    diff = float((approx.to(torch.float64) - ref).norm())
    total = float(ref.norm())
    if total == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / total


def lower_to_lora(module: Module, rank: int | None = None, *, energy: float = DEFAULT_ENERGY,
                  cap: int = DEFAULT_RANK_CAP, dtype: torch.dtype | None = None) -> tuple[LoraModule, float]:
    """Any module as a plain LoRA from the truncated SVD of its ΔW, and the relative error.

    ``rank`` fixes the rank; without it the smallest rank keeping ``energy`` of ‖ΔW‖_F is used,
    at most ``cap``. The singular values are split as ``√S`` on both factors; alpha is the rank
    (scale 1). The error is measured against the factors as stored (after the cast to ``dtype``,
    by default the module's own).
    """
    delta = module.delta(torch.float64)
    shape = tuple(delta.shape)
    matrix = flat2d(delta)
    mode = RankMode() if rank is not None else RankMode("fro", energy)
    limit = rank if rank is not None else cap
    (trunc,) = decompose(matrix, [module.key], cap=max(1, limit), mode=mode, policy=SvdPolicy("exact"))
    up, down = split_singular(trunc.u, trunc.s, trunc.vh)
    k = int(trunc.s.shape[0])
    store = dtype or module.tensors()[0].dtype
    if len(shape) == 4:
        down = down.reshape(k, *shape[1:])
        up = up.reshape(shape[0], k, 1, 1)
    lora = LoraModule(module.component, module.path, alpha=float(k), dora=module.dora,
                      down=down.to(store).contiguous(), up=up.to(store).contiguous())
    return lora, relative_error(delta, lora.delta(torch.float64))
