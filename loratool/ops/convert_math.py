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
from loratool.linalg import (
    RankMode,
    factored_svd,
    fold_core,
    numerical_rank,
    product_sq_norm,
    select_rank,
    split_coefficient,
    split_singular,
    top_singular,
)
from loratool.linalg.structured import structured_factors
from loratool.ops.convert_targets import DEFAULT_ENERGY, DEFAULT_RANK_CAP

NEGLIGIBLE = 1e-12  # singular values below this × σ₁ of an exact factorisation carry no rank


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
    on_up, on_down = split_coefficient(scale, sign_on="up")
    down = (module.down.to(torch.float32) * on_down).to(module.down.dtype)
    up = (module.up.to(torch.float32) * on_up).to(module.up.dtype)
    return replace(module, down=down, up=up, alpha=None, rslora=False)


def fold_tucker(module: LoraModule) -> LoraModule:
    """A LoCon Tucker module (``up · mid · down``) as a flat LoCon with ``down' = mid ⊛ down``.

    ``down'[i, c, h, w] = Σ_j mid[i, j, h, w] · down[j, c]`` has the layer's kernel, so
    ``up @ down'`` is the same ΔW at the same rank. The alpha is rescaled when the core is not
    square, so that ``alpha / rows(down')`` stays the module's scale.
    """
    if module.mid is None:
        return module
    folded = fold_core(module.mid.to(torch.float32), flat2d(module.down).to(torch.float32)).to(module.down.dtype)
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
    shape = tuple(module.weight_shape)
    factors = structured_factors(module)
    limit = max(1, rank if rank is not None else cap)
    if factors is not None:
        up0, down0 = factors
        u, s, vh = factored_svd(up0, down0, dtype=torch.float64, name=module.key)
        keep = max(1, min(numerical_rank(s, NEGLIGIBLE), limit))
        u, s, vh = u[:, :keep], s[:keep], vh[:keep]
        total_sq = product_sq_norm(up0, down0)
    else:
        matrix = flat2d(module.delta(torch.float64))
        u, s, vh = top_singular(matrix, limit, module.key)
        total_sq = float(matrix.square().sum())
    if rank is None:
        k = select_rank(s, RankMode("fro", energy), cap, total_sq=total_sq)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    up, down = split_singular(u, s, vh)
    k = int(s.shape[0])
    store = dtype or module.tensors()[0].dtype
    up, down = up.to(store), down.to(store)
    if factors is not None:  # measured on the factors as stored, never densified
        stacked_up = torch.cat([up0, -up.to(torch.float64)], dim=1)
        stacked_down = torch.cat([down0, down.to(torch.float64)], dim=0)
        err = math.sqrt(max(0.0, product_sq_norm(stacked_up, stacked_down)) / total_sq) if total_sq > 0 else 0.0
    else:
        err = relative_error(matrix, up.to(torch.float64) @ down.to(torch.float64))
    if len(shape) == 4:
        down = down.reshape(k, *shape[1:])
        up = up.reshape(shape[0], k, 1, 1)
    lora = LoraModule(module.component, module.path, alpha=float(k), dora=module.dora,
                      down=down.contiguous(), up=up.contiguous())
    return lora, err
