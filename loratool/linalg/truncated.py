"""The decomposition policy: which SVD runs on which matrix, and what rank is kept.

``decompose`` takes a batch of same-shaped matrices, picks the exact path when asked or when the
matrix is so small that a sketch would cover half of it anyway, runs the randomized path
otherwise, and applies the rank mode per matrix. Singular values are reported with the retained
energy ``Σ_{i≤k} σ_i² / ‖A‖_F²`` measured against the true Frobenius norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loratool.linalg.exact import exact_svd
from loratool.linalg.policy import METHODS, SvdPolicy
from loratool.linalg.randomized import randomized_svd
from loratool.linalg.rank import RankMode, select_rank

__all__ = ["METHODS", "SvdPolicy", "Truncation", "Truncations", "decompose", "decompose_batch"]


@dataclass
class Truncation:
    """One matrix's kept SVD: ``u [m, k]``, ``s [k]``, ``vh [k, n]`` (float32 or float64)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    total_sq: float  # ‖A‖_F²
    method: str
    kept_sq: float | None = None  # Σ_{i≤k} σ_i², when known on the host (saves a device sync)

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    @property
    def retained(self) -> float:
        """Fraction of the Frobenius energy kept, Σ σ_i² / ‖A‖_F² (1 for a zero matrix)."""
        if self.total_sq <= 0:
            return 1.0
        kept = self.kept_sq if self.kept_sq is not None else float(self.s.detach().to(torch.float64).square().sum())
        return min(1.0, kept / self.total_sq)


@dataclass
class Truncations:
    """A batch's kept SVDs, stacked on the compute device (``u [b, m, k]``, ``s [b, k]``, ``vh [b, k, n]``,
    ``k`` the cap), with each matrix's kept rank and energies on the host."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    ranks: list[int]
    totals_sq: list[float]
    kept_sq: list[float]
    method: str

    def __len__(self) -> int:
        return len(self.ranks)

    @property
    def uniform(self) -> bool:
        """Every matrix keeps the whole cap (fixed rank): the stacked factors are the result."""
        return all(r == self.s.shape[-1] for r in self.ranks)

    def __getitem__(self, i: int) -> Truncation:
        k = self.ranks[i]
        return Truncation(self.u[i, :, :k], self.s[i, :k], self.vh[i, :k, :], self.totals_sq[i], self.method,
                          self.kept_sq[i])

    def retained(self, i: int) -> float:
        return self[i].retained


def decompose(a: torch.Tensor, names: Sequence[str], cap: int, mode: RankMode | None = None,
              policy: SvdPolicy | None = None) -> list[Truncation]:
    """Truncated SVDs of a batch ``[b, m, n]`` (or one ``[m, n]``), one :class:`Truncation` each."""
    batch = decompose_batch(a, names, cap, mode, policy)
    return [batch[i] for i in range(len(batch))]


def decompose_batch(a: torch.Tensor, names: Sequence[str], cap: int, mode: RankMode | None = None,
                    policy: SvdPolicy | None = None) -> Truncations:
    """:func:`decompose` kept stacked: the host learns the spectra, norms and ranks in one transfer
    (on a GPU the decomposition itself waits for the host once more, in the randomized path)."""
    mode = mode or RankMode()
    policy = policy or SvdPolicy()
    batch = a.unsqueeze(0) if a.dim() == 2 else a
    m, n = batch.shape[-2:]
    cap = max(1, min(int(cap), m, n))
    exact = policy.uses_exact(cap, m, n)
    if exact:
        u, s, vh = exact_svd(batch, cap)
    else:
        u, s, vh = randomized_svd(batch, cap, names=names, seed=policy.seed, niter=policy.niter,
                                  oversample=policy.oversample)
    totals = torch.linalg.vector_norm(batch, dim=(-2, -1), dtype=torch.float64).square()
    finite = torch.isfinite(s).all().to(torch.float64).reshape(1)
    host = torch.cat([finite, totals, s.to(torch.float64).reshape(-1)]).cpu()
    if not exact and host[0] == 0:
        u, s, vh = exact_svd(batch, cap)
        host = torch.cat([host[:1 + len(totals)], s.to(torch.float64).reshape(-1).cpu()])
        exact = True
    b = batch.shape[0]
    totals_sq = host[1:1 + b].tolist()
    spectra = host[1 + b:].reshape(b, -1)
    totals_sum = _nuclear_norms(batch) if mode.needs_full_spectrum else [None] * b
    ranks = [select_rank(spectra[i], mode, cap, total_sq=totals_sq[i], total_sum=totals_sum[i]) for i in range(b)]
    kept = [float(spectra[i, :k].clamp_min(0).square().sum()) for i, k in enumerate(ranks)]
    return Truncations(u, s, vh, ranks, totals_sq, kept, "exact" if exact else "randomized")


def _nuclear_norms(batch: torch.Tensor) -> list[float]:
    """Σ σ_i for each matrix, from the eigenvalues of the smaller Gram matrix (float64)."""
    x = batch.to(torch.float64)
    if x.shape[-2] < x.shape[-1]:
        x = x.transpose(-1, -2)
    evals = torch.linalg.eigvalsh(x.transpose(-1, -2) @ x).clamp_min(0)
    return evals.sqrt().sum(dim=-1).cpu().tolist()
