"""Rank selection: a fixed rank, or the *minimal* rank meeting a spectral target.

Modes (``-r`` is always the cap):

* ``fixed``            the cap itself (no larger than the matrix allows);
* ``fro:t``            smallest k with ‖A_k‖_F / ‖A‖_F ≥ t (t in (0, 1]);
* ``ratio:t``          number of singular values with σ_i > σ_1 / t (t ≥ 1);
* ``cumulative:t``     smallest k with Σ_{i≤k} σ_i / Σ σ_i ≥ t (needs the whole spectrum).

kohya's ``resize_lora`` returns one more than these (reference/kohya.md §3.3); we return the
minimum. ``fro`` is measured against the true ‖A‖_F (cheap), so a truncated spectrum from a
randomized SVD still gives the right answer. An all-zero matrix gets rank 1.
"""

from __future__ import annotations

import torch

from loratool.linalg.policy import MODES, RankMode, parse_rank_mode

__all__ = ["MODES", "RankMode", "numerical_rank", "parse_rank_mode", "select_rank"]
_SLACK = 1e-12  # a target met up to float64 rounding counts as met


def select_rank(s: torch.Tensor, mode: RankMode, cap: int, total_sq: float | None = None,
                total_sum: float | None = None) -> int:
    """The rank to keep for one matrix with (leading, descending) singular values ``s``.

    ``total_sq`` is ‖A‖_F² (defaults to Σ s², exact when ``s`` is the whole spectrum);
    ``total_sum`` is Σ σ over the whole spectrum (``cumulative`` only; defaults to Σ s).
    """
    s64 = s.detach().to("cpu", torch.float64).clamp_min(0)
    cap = max(1, min(int(cap), s64.numel()) if s64.numel() else 1)
    if s64.numel() == 0 or float(s64[0]) == 0.0:
        return 1
    if mode.kind == "fixed":
        return cap
    if mode.kind == "ratio":
        k = int((s64 > s64[0] / mode.value).sum())
    elif mode.kind == "fro":
        total = float(s64.square().sum()) if total_sq is None else float(total_sq)
        k = _first_reaching(s64.square().cumsum(0), mode.value ** 2 * total)
    else:
        total = float(s64.sum()) if total_sum is None else float(total_sum)
        k = _first_reaching(s64.cumsum(0), mode.value * total)
    return max(1, min(k, cap))


def _first_reaching(cumulative: torch.Tensor, target: float) -> int:
    """1-based index of the first partial sum ≥ target (len+1 when none is)."""
    reached = cumulative >= target * (1 - _SLACK)
    if not bool(reached.any()):
        return cumulative.numel() + 1
    return int(torch.nonzero(reached)[0, 0]) + 1


def numerical_rank(s: torch.Tensor, rtol: float) -> int:
    """How many singular values (descending ``s``) exceed ``rtol·σ₁``: the rank a matrix has above
    its rounding noise (0 for an empty or all-zero spectrum)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > rtol * s[0]).sum())
