"""Small helpers shared by the decompositions: orientation and a sign convention."""

from __future__ import annotations

import torch

from loratool.core.finite import all_finite
from loratool.errors import LoraToolError


def require_finite(name: str | None, *tensors: torch.Tensor) -> None:
    """Refuse NaN or ±inf before a decomposition (LAPACK would fail to converge or return garbage),
    naming the module."""
    if not all(all_finite(t) for t in tensors):
        raise LoraToolError(f"{name or 'a matrix'}: holds NaN or infinite values, so it has no SVD "
                            "(the input is damaged, or a scale overflowed)")


def as_batch(a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``[m, n]`` -> ``[1, m, n]``; a 3-D batch is kept. Returns (batch, was_2d)."""
    if a.dim() == 2:
        return a.unsqueeze(0), True
    if a.dim() != 3:
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(a.shape)}")
    return a, False


def fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of its ``u`` column is positive.

    Singular vectors are defined up to sign; fixing it makes different paths (batched or not,
    exact or randomized) produce the same factors, not mirror images.
    """
    idx = u.abs().argmax(dim=-2, keepdim=True)  # [b, 1, k]
    sign = torch.gather(u, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, vh * sign.transpose(-1, -2)


def finish(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, *, wide: bool,
           was_2d: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last steps every decomposition shares: undo the tall orientation (a wide input was
    transposed), fix the signs, and drop the batch dimension a single matrix was given."""
    if wide:
        u, vh = vh.transpose(-1, -2), u.transpose(-1, -2)
    u, vh = fix_signs(u, vh)
    if was_2d:
        return u[0], s[0], vh[0]
    return u, s, vh
