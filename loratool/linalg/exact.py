"""The exact truncated SVD: the reference path, and the fallback for small or awkward matrices.

Float64 throughout. The Gram matrix of the smaller side is diagonalised (``eigh``), which is
several times faster than a full SVD; when the kept singular values span too wide a range for the
Gram route to be accurate (``σ_k < 1e-6·σ_1``), a thin ``linalg.svd`` is used instead.
"""

from __future__ import annotations

import torch

from loratool.linalg.orient import as_batch, finish

GRAM_RELATIVE_FLOOR = 1e-6


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
    if u is None:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    return finish(u, s, vh, wide=wide, was_2d=was_2d)


def _gram_svd(x: torch.Tensor, k: int):
    """Tall ``x``: eigh of ``xᵀx``; ``(None, None, None)`` when the Gram route is not accurate enough."""
    if k == 0:
        b, m, n = x.shape
        return x.new_zeros((b, m, 0)), x.new_zeros((b, 0)), x.new_zeros((b, 0, n))
    evals, evecs = torch.linalg.eigh(x.transpose(-1, -2) @ x)  # ascending
    evals = evals.flip(-1)[..., :k].clamp_min(0)
    v = evecs.flip(-1)[..., :k]
    s = evals.sqrt()
    top = s[..., :1]
    if bool(((s[..., -1:] < GRAM_RELATIVE_FLOOR * top) & (top > 0)).any()):
        return None, None, None
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = (x @ v) / safe.unsqueeze(-2)
    u = torch.where(s.unsqueeze(-2) > 0, u, torch.zeros_like(u))
    return u, s, v.transpose(-1, -2)
