"""The SVD of a low-rank product ``up @ down`` computed on its factors.

A LoRA update ``up [out, R] @ down [R, in]`` has rank at most ``R``, which is tiny next to ``out``
and ``in``. Its SVD never needs the dense ``[out, in]`` matrix:

    up = Qu Ru            (QR, Qu [out, p] orthonormal columns, Ru [p, R])
    downᵀ = Qd Rd         (QR, Qd [in, q] orthonormal columns, Rd [q, R])
    up @ down = Qu (Ru Rdᵀ) Qdᵀ
    Ru Rdᵀ = Uc S Vcᵀ     (SVD of a p×q core, p, q ≤ R)
    up @ down = (Qu Uc) S (Qd Vc)ᵀ

Cost: O((out + in)·R² + R³) instead of O(out·in·min(out, in)), and memory O((out + in)·R).
Stacking the factors of several LoRAs (``[up1 | up2]``, ``[down1; down2]``) gives the SVD of
their sum the same way, which is what ``mix --mode svd`` and ``resize`` use.
"""

from __future__ import annotations

import math

import torch

from loratool.errors import LoraToolError
from loratool.linalg.orient import require_finite


def factored_svd(
    up2d: torch.Tensor,
    down2d: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    rank: int | None = None,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``up2d @ down2d`` without forming the product.

    ``up2d`` is ``[out, R]`` and ``down2d`` is ``[R, in]``. Returns ``U [out, k]``, ``S [k]``
    (descending, non-negative) and ``Vh [k, in]`` with ``k = min(out, in, R)`` — or ``rank``
    when given and smaller — such that ``U @ diag(S) @ Vh`` equals the product (truncated to the
    best rank-``k`` approximation when ``rank`` cuts it). Computed in ``dtype`` (float32 by
    default, float64 for a reference) on the factors' device. ``name`` (the module) is what a
    one-line error names when a factor holds NaN or ±inf.
    """
    if up2d.dim() != 2 or down2d.dim() != 2:
        raise ValueError(f"factored_svd needs 2-D factors, got {tuple(up2d.shape)} and {tuple(down2d.shape)}")
    if up2d.shape[1] != down2d.shape[0]:
        raise ValueError(f"inner sizes disagree: up {tuple(up2d.shape)} @ down {tuple(down2d.shape)}")
    up = up2d.to(dtype)
    down = down2d.to(dtype)
    require_finite(name, up, down)  # also catches a cast to ``dtype`` that overflowed
    q_up, r_up = torch.linalg.qr(up, mode="reduced")  # [out, p], [p, R]
    q_down, r_down = torch.linalg.qr(down.T, mode="reduced")  # [in, q], [q, R]
    core = r_up @ r_down.T  # [p, q]
    if not bool(torch.isfinite(core).all()):  # finite factors whose product overflows ``dtype``
        raise LoraToolError(f"{name or 'a matrix'}: its factors are too large: their product overflows {dtype}")
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    u = q_up @ u_core  # [out, k]
    vh = vh_core @ q_down.T  # [k, in]
    if rank is not None and rank < s.shape[0]:
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    return u, s, vh


def stack_factors(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of a sum of products: ``Σ up_i @ down_i = [up_1 | up_2 | …] @ [down_1; down_2; …]``."""
    if not pairs:
        raise ValueError("stack_factors needs at least one (up, down) pair")
    ups = torch.cat([u.to(dtype) for u, _ in pairs], dim=1)
    downs = torch.cat([d.to(dtype) for _, d in pairs], dim=0)
    return ups, downs


def product_sq_norm(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
    """``‖up @ down‖_F²`` from the two Gram matrices of the inner size, never the product:
    ``tr((upᵀup)(down downᵀ))``. The Gram products (the only ``O((out + in)·R²)`` work) run in
    ``dtype``; their elementwise product is summed in float64."""
    u = up.to(dtype)
    d = down.to(dtype)
    gram_up = (u.T @ u).to(torch.float64)
    gram_down = (d @ d.T).to(torch.float64)
    return float((gram_up * gram_down).sum())


def product_norm(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> float:
    """``‖up · [mid] · down‖_F`` of 2-D factors ``up [out, r]``, ``down [r, in]`` (and a Tucker core
    ``mid [r, r, kh, kw]``: ``ΔW[:, :, h, w] = up · mid[:, :, h, w] · down``), on ``r×r`` Gram
    matrices computed in ``dtype`` (float32: relative error ~1e-6, twice the speed of float64 on a
    CPU); the small rest runs in float64. When the rank is so high that ``out·in·r`` is less work,
    the product itself is formed instead."""
    u, d = up.to(dtype), down.to(dtype)
    (out, r), k = u.shape, d.shape[1]
    if mid is None and out * k * r <= (out + k) * r * r:  # rank near min(out, in): the product is cheaper
        return float((u @ d).to(torch.float64).norm())
    if mid is None:
        return math.sqrt(max(product_sq_norm(u, d, dtype), 0.0))
    gram_up = (u.T @ u).to(torch.float64)
    gram_down = (d @ d.T).to(torch.float64)
    core = mid.to(torch.float64)
    sq = 0.0
    for h in range(core.shape[2]):
        for w in range(core.shape[3]):
            c = core[:, :, h, w]
            sq += float((c * (gram_up @ c @ gram_down)).sum())
    return math.sqrt(max(sq, 0.0))


def fold_core(mid: torch.Tensor, down2d: torch.Tensor) -> torch.Tensor:
    """A Tucker core folded into ``down``: ``down'[i, c, h, w] = Σ_j mid[i, j, h, w] · down[j, c]``,
    so that ``up @ flat(down')`` is the Tucker ΔW at the same rank (exact)."""
    return torch.einsum("ijhw,jc->ichw", mid, down2d)


def tail_energy(s_all: torch.Tensor, rank: int) -> tuple[float, float]:
    """Frobenius error of the best rank-``rank`` approximation (Eckart–Young), absolute and relative.

    ``s_all`` are all singular values of the matrix (the tail beyond ``rank`` is the error).
    """
    s64 = s_all.to(torch.float64)
    total = float(s64.square().sum().sqrt())
    tail = float(s64[rank:].square().sum().sqrt()) if rank < s64.shape[0] else 0.0
    return tail, (tail / total if total > 0 else 0.0)
