"""Exact decompositions: the reference path, the fallback for small or awkward matrices, and the
full spectrum when a caller needs all of it.

* :func:`exact_svd` — top-``rank`` SVD in float64. The Gram matrix of the smaller side is
  diagonalised (``eigh``), several times faster than a full SVD; when the kept singular values span
  too wide a range for the Gram route to be accurate (``σ_k < 1e-6·σ_1``), a thin ``linalg.svd``
  is used instead.
* :func:`top_singular` — the same Gram route without that fallback: singular values below
  ``1e-12·σ₁`` are dropped instead, which keeps it fast on the wide, very low-rank ΔW of a
  LoKr/LoHa conv (e.g. 1280 × 11520 at rank 16), where a full SVD is slow.
* :func:`thin_svd` — every singular triplet (``linalg.svd``, reduced), in the input's dtype.
"""

from __future__ import annotations

import torch

from loratool.linalg.orient import as_batch, finish, require_finite
from loratool.linalg.rank import numerical_rank

GRAM_RELATIVE_FLOOR = 1e-6
NEGLIGIBLE = 1e-12  # top_singular drops singular values below this × σ₁


def exact_svd(a: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``a`` (``[m, n]`` or ``[b, m, n]``) in float64.

    Returns ``U [.., m, k]``, ``S [.., k]`` descending, ``Vh [.., k, n]`` with
    ``k = min(rank, m, n)`` (all of them without ``rank``).
    """
    batch, was_2d = as_batch(a)
    m, n = batch.shape[-2:]
    k = min(m, n) if rank is None else max(0, min(rank, m, n))
    x = batch.to(torch.float64)
    wide = m < n
    if wide:
        x = x.transpose(-1, -2)  # tall: [b, M, N] with M >= N
    u, s, vh = _gram_svd(x, k)
    if bool(((s[..., -1:] < GRAM_RELATIVE_FLOOR * s[..., :1]) & (s[..., :1] > 0)).any()):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    return finish(u, s, vh, wide=wide, was_2d=was_2d)


def top_singular(matrix: torch.Tensor, cap: int, name: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading (at most ``cap``, at least one) singular triplets of a matrix in float64, from the
    eigenvectors of the smaller Gram matrix; singular values below ``1e-12·σ₁`` are dropped (they
    carry no energy worth a rank). The kept ones are as accurate as the Gram route allows: the
    caller measures the error of what it keeps anyway. ``name``: the module, for errors."""
    require_finite(name, matrix)
    x = matrix.to(torch.float64)
    wide = x.shape[0] <= x.shape[1]
    tall = x.T if wide else x
    u, s, vh = _gram_svd(tall.unsqueeze(0), min(tall.shape))
    keep = max(1, min(numerical_rank(s[0], NEGLIGIBLE), cap))
    u, s, vh = u[0, :, :keep], s[0, :keep], vh[0, :keep]
    return (vh.T, s, u.T) if wide else (u, s, vh)


def thin_svd(a: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every singular triplet of ``a`` (reduced ``U``, ``S`` descending, ``Vh``), in ``a``'s dtype
    (``name``: the module, for the error when ``a`` is not finite)."""
    require_finite(name, a)
    return torch.linalg.svd(a, full_matrices=False)


def _gram_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tall ``x [b, M, N]``: the top ``k`` triplets from ``eigh(xᵀx)`` (``u`` columns of zero singular
    values are zero)."""
    if k == 0:
        b, m, n = x.shape
        return x.new_zeros((b, m, 0)), x.new_zeros((b, 0)), x.new_zeros((b, 0, n))
    evals, evecs = torch.linalg.eigh(x.transpose(-1, -2) @ x)  # ascending
    s = evals.flip(-1)[..., :k].clamp_min(0).sqrt()
    v = evecs.flip(-1)[..., :k]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = (x @ v) / safe.unsqueeze(-2)
    u = torch.where(s.unsqueeze(-2) > 0, u, torch.zeros_like(u))
    return u, s, v.transpose(-1, -2)
