"""Optional quantile clamp of LoRA factors (kohya's ``--clamp_quantile``), off by default.

kohya pools the signed entries of up and down, takes ``torch.quantile(pooled, q)`` and clamps both
factors to ``[-hi, hi]``. ``torch.quantile`` refuses more than 2^24 elements; this computes the
same linearly interpolated quantile with ``kthvalue``, which has no such limit.
"""

from __future__ import annotations

import math

import torch


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of ``values`` with linear interpolation (numpy's / torch's default)."""
    flat = values.reshape(-1).to(torch.float32)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    v_lo = float(torch.kthvalue(flat.cpu(), lo + 1).values)
    if hi == lo or pos == lo:
        return v_lo
    v_hi = float(torch.kthvalue(flat.cpu(), hi + 1).values)
    return v_lo + (v_hi - v_lo) * (pos - lo)


def clamp_factors(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both factors clamped to ``±quantile(pooled signed entries, q)``; ``q >= 1`` changes nothing."""
    if q >= 1.0:
        return up, down
    hi = quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)
