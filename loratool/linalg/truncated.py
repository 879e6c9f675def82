"""The decomposition policy: which SVD runs on which matrix, and what rank is kept.

``decompose`` takes a batch of same-shaped matrices, picks the exact path when asked or when the
matrix is so small that a sketch would cover half of it anyway, runs the randomized path
otherwise, and applies the rank mode per matrix. Singular values are reported with the retained
energy ``Σ_{i≤k} σ_i² / ‖A‖_F²`` measured against the true Frobenius norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loratool.linalg.exact import exact_svd
from loratool.linalg.orient import require_finite
from loratool.linalg.randomized import randomized_svd, sketch_width
from loratool.linalg.rank import RankMode, select_rank

METHODS = ("randomized", "exact")


@dataclass(frozen=True)
class SvdPolicy:
    method: str = "randomized"
    niter: int = 2
    oversample: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"svd method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.niter < 0:
            raise ValueError("niter must be >= 0")

    def uses_exact(self, rank: int, m: int, n: int) -> bool:
        if self.method == "exact":
            return True
        return 2 * sketch_width(rank, self.oversample, m, n) >= min(m, n)


@dataclass
class Truncation:
    """One matrix's kept SVD: ``u [m, k]``, ``s [k]``, ``vh [k, n]`` (float32 or float64)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    total_sq: float  # ‖A‖_F²
    method: str

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    @property
    def retained(self) -> float:
        """Fraction of the Frobenius energy kept, Σ σ_i² / ‖A‖_F² (1 for a zero matrix)."""
        if self.total_sq <= 0:
            return 1.0
        kept = float(self.s.detach().to(torch.float64).square().sum())
        return min(1.0, kept / self.total_sq)


def decompose(a: torch.Tensor, names: Sequence[str], cap: int, mode: RankMode | None = None,
              policy: SvdPolicy | None = None) -> list[Truncation]:
    """Truncated SVDs of a batch ``[b, m, n]`` (or one ``[m, n]``), one :class:`Truncation` each."""
    mode = mode or RankMode()
    policy = policy or SvdPolicy()
    batch = a.unsqueeze(0) if a.dim() == 2 else a
    m, n = batch.shape[-2:]
    cap = max(1, min(int(cap), m, n))
    totals_sq = torch.linalg.vector_norm(batch, dim=(-2, -1), dtype=torch.float64).square().cpu().tolist()
    for i, total in enumerate(totals_sq):  # NaN or ±inf anywhere makes the norm so: no pass of its own
        if not math.isfinite(total):
            require_finite(names[i] if i < len(names) else None, batch[i])
    exact = policy.uses_exact(cap, m, n)
    if exact:
        u, s, vh = exact_svd(batch, cap)
    else:
        u, s, vh = randomized_svd(batch, cap, names=names, seed=policy.seed, niter=policy.niter,
                                  oversample=policy.oversample)
        if not bool(torch.isfinite(s).all()):
            u, s, vh, exact = *exact_svd(batch, cap), True
    totals_sum = _nuclear_norms(batch) if mode.needs_full_spectrum else [None] * len(totals_sq)
    out = []
    for i in range(batch.shape[0]):
        k = select_rank(s[i], mode, cap, total_sq=totals_sq[i], total_sum=totals_sum[i])
        out.append(Truncation(u[i, :, :k], s[i, :k], vh[i, :k, :], totals_sq[i],
                              "exact" if exact else "randomized"))
    return out


def _nuclear_norms(batch: torch.Tensor) -> list[float]:
    """Σ σ_i for each matrix, from the eigenvalues of the smaller Gram matrix (float64)."""
    x = batch.to(torch.float64)
    if x.shape[-2] < x.shape[-1]:
        x = x.transpose(-1, -2)
    evals = torch.linalg.eigvalsh(x.transpose(-1, -2) @ x).clamp_min(0)
    return evals.sqrt().sum(dim=-1).cpu().tolist()
