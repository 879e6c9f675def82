"""Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Algorithms 4.4 and 5.1).

For a tall ``A [m, n]`` (a wide one is transposed first) and target rank ``k``:

    Ω [n, ℓ] Gaussian, ℓ = k + p           (p: oversampling, default max(k, 8) so ℓ ≈ 2k)
    Q = qr(A Ω)
    repeat niter times:  Q = qr(A qr(Aᵀ Q))  (power iterations, re-orthonormalised every step)
    Bᵀ = Aᵀ Q [n, ℓ] = Q2 R2                (a QR keeps the final SVD ℓ×ℓ, whatever n is)
    R2ᵀ = Ur S Vrᵀ
    A ≈ (Q Ur) S (Q2 Vr)ᵀ, truncated to k

Everything runs batched over ``[b, m, n]`` (one batched matmul/QR per step on the GPU) in float32
whatever the storage dtype. The sketch of each matrix comes from its own seeded stream
(:mod:`loratool.linalg.seeding`), so results are reproducible and independent of batching order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loratool.linalg.orient import as_batch, fix_signs
from loratool.linalg.seeding import gaussian_sketch


def sketch_width(rank: int, oversample: int | None, m: int, n: int) -> int:
    """ℓ = rank + oversampling (at least 8; default ``max(rank, 8)``), capped by the matrix size."""
    extra = max(rank, 8) if oversample is None else max(int(oversample), 8)
    return min(rank + extra, m, n)


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    *,
    names: Sequence[str],
    seed: int = 0,
    niter: int = 2,
    oversample: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of ``a`` (``[m, n]`` or ``[b, m, n]``), one name per matrix for the seed.

    Returns float32 ``U [.., m, k]``, ``S [.., k]``, ``Vh [.., k, n]``, ``k = min(rank, m, n)``.
    """
    batch, was_2d = as_batch(a)
    if len(names) != batch.shape[0]:
        raise ValueError(f"{len(names)} names for a batch of {batch.shape[0]} matrices")
    x = batch.to(torch.float32)
    m, n = x.shape[-2:]
    wide = m < n
    if wide:
        x = x.transpose(-1, -2)
    k = max(0, min(rank, m, n))
    width = sketch_width(k, oversample, x.shape[-2], x.shape[-1])
    u, s, vh = _range_finder_svd(x, width, niter, seed, names)
    u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    if wide:
        u, vh = vh.transpose(-1, -2), u.transpose(-1, -2)
    u, vh = fix_signs(u, vh)
    if was_2d:
        return u[0], s[0], vh[0]
    return u, s, vh


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced")[0]


def _range_finder_svd(x: torch.Tensor, width: int, niter: int, seed: int, names: Sequence[str]):
    """Tall ``x [b, M, N]``: the SVD of ``x`` restricted to a ``width``-dim sketched range."""
    omega = gaussian_sketch(x.shape[-1], width, seed, names, device=x.device)
    q = _orth(x @ omega)  # [b, M, ℓ]
    xt = x.transpose(-1, -2)
    for _ in range(int(niter)):
        q = _orth(x @ _orth(xt @ q))
    q2, r2 = torch.linalg.qr(xt @ q, mode="reduced")  # Bᵀ = Aᵀ Q = Q2 R2, [b, N, ℓ], [b, ℓ, ℓ]
    ur, s, vrh = torch.linalg.svd(r2.transpose(-1, -2), full_matrices=False)  # B = R2ᵀ Q2ᵀ
    u = q @ ur
    vh = vrh @ q2.transpose(-1, -2)
    return u, s, vh
