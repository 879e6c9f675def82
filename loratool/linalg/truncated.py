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
from loratool.linalg.orient import require_finite
from loratool.linalg.policy import METHODS, SvdPolicy
from loratool.linalg.randomized import randomized_svd, randomized_svd_deferred
from loratool.linalg.rank import RankMode, select_rank

__all__ = ["METHODS", "PendingBatch", "SvdPolicy", "Truncation", "Truncations", "decompose", "decompose_batch",
           "sq_norms", "start_batch"]


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
    redone: bool = False  # the first, unchecked result did not hold and was redone (PendingBatch.settle)

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
    """:func:`decompose` kept stacked: the host learns the spectra, norms, ranks and whether the fast
    path held in one transfer (:func:`start_batch`, then :meth:`PendingBatch.settle`)."""
    pending = start_batch(a, names, cap, mode, policy)
    return pending.settle(pending.head().cpu())


def start_batch(a: torch.Tensor, names: Sequence[str], cap: int, mode: RankMode | None = None,
                policy: SvdPolicy | None = None) -> PendingBatch:
    """The decomposition of a batch ``[b, m, n]`` (or one ``[m, n]``) launched, nothing read back: on a
    GPU the host does not wait for the device here (the exact path's choice of route aside), so a caller
    can queue more work on the guessed result (factors, errors) before it reads :meth:`PendingBatch.head`
    with it, in one transfer."""
    mode = mode or RankMode()
    policy = policy or SvdPolicy()
    batch = a.unsqueeze(0) if a.dim() == 2 else a
    m, n = batch.shape[-2:]
    cap = max(1, min(int(cap), m, n))
    exact = policy.uses_exact(cap, m, n)
    totals = sq_norms(batch)
    held = None
    try:
        if exact:
            u, s, vh = exact_svd(batch, cap)
        else:
            u, s, vh, held = randomized_svd_deferred(batch, cap, names=names, seed=policy.seed, niter=policy.niter,
                                                     oversample=policy.oversample)
    except RuntimeError:  # LAPACK gives up on NaN/inf: name the module instead
        _refuse_non_finite(batch, names, _overflowed_again(batch, totals.cpu()))
        raise
    return PendingBatch(batch, list(names), cap, mode, policy, exact, u, s, vh, totals, held)


@dataclass
class PendingBatch:
    """A batch's decomposition as :func:`start_batch` launched it: the guess ``u``, ``s``, ``vh`` on the
    device, not yet known to be usable."""

    batch: torch.Tensor
    names: list[str]
    cap: int
    mode: RankMode
    policy: SvdPolicy
    exact: bool
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    totals: torch.Tensor  # ‖A‖_F² of each matrix, float64 on the device
    held: torch.Tensor | None  # the randomized path's unchecked steps held (a device flag), None if checked

    def head(self) -> torch.Tensor:
        """What the host needs before the guess can be used, as one float64 vector on the device: whether
        the unchecked steps held, whether every singular value is finite, each matrix's ‖A‖_F², then the
        spectra ``[b, k]`` flattened."""
        finite = torch.isfinite(self.s).all()
        held = self.held if self.held is not None else torch.ones_like(finite)
        flags = torch.stack([held, finite]).to(torch.float64)
        return torch.cat([flags, self.totals, self.s.to(torch.float64).reshape(-1)])

    def settle(self, head: torch.Tensor) -> Truncations:
        """The batch's :class:`Truncations`, from its :meth:`head` read on the host: a matrix holding NaN or
        ±inf is refused by name; a randomized batch whose unchecked steps did not hold is redone with every
        step checked, and one whose singular values are not finite is redone exactly. ``redone`` then says
        so: anything formed from the guess is not the result."""
        b = self.batch.shape[0]
        totals = _overflowed_again(self.batch, head[2:2 + b])
        _refuse_non_finite(self.batch, self.names, totals)
        u, s, vh, spectra, exact = self.u, self.s, self.vh, head[2 + b:], self.exact
        finite, redone = bool(head[1]), False
        if not bool(head[0]):
            u, s, vh = randomized_svd(self.batch, self.cap, names=self.names, seed=self.policy.seed,
                                      niter=self.policy.niter, oversample=self.policy.oversample, checked=True)
            spectra = s.to(torch.float64).reshape(-1).cpu()
            finite, redone = bool(torch.isfinite(spectra).all()), True
        if not exact and not finite:
            u, s, vh = exact_svd(self.batch, self.cap)
            spectra = s.to(torch.float64).reshape(-1).cpu()
            exact, redone = True, True
        totals_sq = totals.tolist()
        spectra = spectra.reshape(b, -1)
        mode = self.mode
        totals_sum = _nuclear_norms(self.batch) if mode.needs_full_spectrum else [None] * b
        ranks = [select_rank(spectra[i], mode, self.cap, total_sq=totals_sq[i], total_sum=totals_sum[i])
                 for i in range(b)]
        kept = [float(spectra[i, :k].clamp_min(0).square().sum()) for i, k in enumerate(ranks)]
        return Truncations(u, s, vh, ranks, totals_sq, kept, "exact" if exact else "randomized", redone)


NORM_CHUNK = 1 << 24  # elements: the norms of large weights are taken this many at a time


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x[i]‖_F² of each matrix of a stack ``[n, rows, cols]``, float64 ``[n]`` on its device: taken in
    float32 (accumulated in float64 on a CPU) and squared in float64, at most ``NORM_CHUNK`` elements at a
    time, so no float32 or float64 copy of a large batch or stored weight is made. A norm past float32's
    range comes out infinite (:func:`_overflowed_again` takes it again exactly where that matters)."""
    n, rows, cols = x.shape
    if rows * cols <= NORM_CHUNK:
        per = max(1, NORM_CHUNK // max(1, rows * cols))
        return torch.cat([_part_sq(x[i:i + per], dim=(1, 2)) for i in range(0, n, per)])
    step = max(1, NORM_CHUNK // max(1, cols))
    return torch.stack([sum(_part_sq(x[i, r:r + step]) for r in range(0, rows, step)) for i in range(n)])


def _part_sq(x: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=dim, dtype=torch.float32).double().square()


def _overflowed_again(batch: torch.Tensor, totals_sq: torch.Tensor) -> torch.Tensor:
    """``totals_sq`` (on the host) with each infinite entry taken again in float64: NaN or ±inf in the
    matrix keeps it so, a finite matrix whose norm only overflowed float32 gets its true value."""
    bad = torch.nonzero(~torch.isfinite(totals_sq)).flatten().tolist()
    if not bad:
        return totals_sq
    totals_sq = totals_sq.clone()
    for i in bad:
        totals_sq[i] = float(torch.linalg.vector_norm(batch[i], dtype=torch.float64).square())
    return totals_sq


def _refuse_non_finite(batch: torch.Tensor, names: Sequence[str], totals_sq: torch.Tensor) -> None:
    """NaN or ±inf anywhere in a matrix makes its norm so (no pass of its own): name the first such one."""
    for i in torch.nonzero(~torch.isfinite(totals_sq)).flatten().tolist()[:1]:
        require_finite(names[i] if i < len(names) else None, batch[i])


def _nuclear_norms(batch: torch.Tensor) -> list[float]:
    """Σ σ_i for each matrix, from the eigenvalues of the smaller Gram matrix (float64)."""
    x = batch.to(torch.float64)
    if x.shape[-2] < x.shape[-1]:
        x = x.transpose(-1, -2)
    evals = torch.linalg.eigvalsh(x.transpose(-1, -2) @ x).clamp_min(0)
    return evals.sqrt().sum(dim=-1).cpu().tolist()
