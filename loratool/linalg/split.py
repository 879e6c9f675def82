"""LoRA factors from a truncated SVD: the singular values split as ``√S`` on each side.

``up = U·√S`` and ``down = √S·Vh`` keep both factors of the same magnitude, so neither overflows
fp16 when the spectrum is large (putting all of ``S`` in ``up``, as kohya does, can).
"""

from __future__ import annotations

import math

import torch


def split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down = U·diag(S)·Vh``, ``√S`` on each side (negative rounding noise
    in ``S`` counts as 0), computed in ``dtype`` (default: the inputs'); batched over leading dims."""
    if dtype is not None:
        u, s, vh = u.to(dtype), s.to(dtype), vh.to(dtype)
    root = s.clamp_min(0).sqrt()
    return u * root.unsqueeze(-2), root.unsqueeze(-1) * vh


def split_coefficient(coef: float, sign_on: str = "down") -> tuple[float, float]:
    """``(on_up, on_down)`` with ``on_up·on_down = coef`` and both ``√|coef|`` in size, the sign on the
    side ``sign_on`` names: a scalar shared by ``up`` and ``down`` the way the singular values are,
    keeping both factors in range."""
    root = math.sqrt(abs(coef))
    signed = -root if coef < 0 else root
    return (signed, root) if sign_on == "up" else (root, signed)
