"""Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Algorithms 4.4 and 5.1).

For a tall ``A [m, n]`` (a wide one is transposed first) and target rank ``k``:

    Ω [n, ℓ] Gaussian, ℓ = k + p           (p: oversampling, default max(k, 8) so ℓ ≈ 2k)
    Q = qr(A Ω)
    repeat niter times:  Q = qr(A qr(Aᵀ Q))  (power iterations, re-orthonormalised every step)
    Bᵀ = Aᵀ Q [n, ℓ] = Q2 R2                (a QR keeps the final SVD ℓ×ℓ, whatever n is)
    R2ᵀ = Ur S Vrᵀ
    A ≈ (Q Ur) S (Q2 Vr)ᵀ, truncated to k

Everything runs batched over ``[b, m, n]`` (one batched matmul/QR per step on the GPU) in float32
whatever the storage dtype. On a GPU the ℓ×ℓ core SVD goes through cuSOLVER's batched ``gesvda`` in
float64, checked on the device: ``torch.linalg.svd``'s default driver loops over the batch, and on an
H100 it took 2.76 s of SDXL's 3.2 s of compute (1052 cores of 128×128), ``gesvda`` 0.15 s (float32).
The sketch of each matrix comes from its own seeded stream
(:mod:`loratool.linalg.seeding`), so results are reproducible and independent of batching order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from loratool.linalg.orient import as_batch, finish
from loratool.linalg.policy import sketch_width
from loratool.linalg.seeding import gaussian_sketch


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    *,
    names: Sequence[str],
    seed: int = 0,
    niter: int = 2,
    oversample: int | None = None,
    checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of ``a`` (``[m, n]`` or ``[b, m, n]``), one name per matrix for the seed.

    Returns float32 ``U [.., m, k]``, ``S [.., k]``, ``Vh [.., k, n]``, ``k = min(rank, m, n)``. On a GPU
    the steps run unchecked and are redone checked when one did not hold; ``checked=True`` checks each
    step as it goes (a wait for the device each: the redo of a batch whose unchecked steps failed).
    """
    u, s, vh, held = _svd(a, rank, names, seed, niter, oversample, checked=checked or a.device.type == "cpu")
    if held is not None and not bool(held):
        u, s, vh, _ = _svd(a, rank, names, seed, niter, oversample, checked=True)
    return u, s, vh


def randomized_svd_deferred(
    a: torch.Tensor,
    rank: int,
    *,
    names: Sequence[str],
    seed: int = 0,
    niter: int = 2,
    oversample: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`randomized_svd` without waiting for the device: ``(U, S, Vh, held)``. On a GPU the checks
    are not read: ``held`` is a 0-d device bool saying whether every unchecked step held, for the caller
    to read with whatever else it needs from the device, and to call :func:`randomized_svd` with
    ``checked=True`` when it did not (the factors are then not to be used). On a CPU every step is checked as it goes and
    ``held`` is ``None``."""
    return _svd(a, rank, names, seed, niter, oversample, checked=a.device.type == "cpu")


def _svd(a: torch.Tensor, rank: int, names: Sequence[str], seed: int, niter: int, oversample: int | None,
         checked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
    if checked:
        u, s, vh = _range_finder_svd(x, width, niter, seed, names, _orth, _core_svd)
        held = None
    else:  # the checks wait for the device: they are gathered into one flag for the caller to read
        checks: list[torch.Tensor] = []
        u, s, vh = _range_finder_svd(x, width, niter, seed, names,
                                     lambda y, final: _orth_unchecked(y, checks, final),
                                     lambda c: _core_svd_batched(c, checks))
        held = torch.stack(checks).all()
    u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    return (*finish(u, s, vh, wide=wide, was_2d=was_2d), held)


def _orth(y: torch.Tensor, final: bool = True) -> torch.Tensor:
    """Orthonormal basis of the columns of a tall ``y [b, M, ℓ]``.

    CholeskyQR in float64 (Gram/Cholesky/triangular-solve passes: matmul-bound, and immune to the
    collapse of threaded LAPACK Householder QR on a busy CPU, where one 10240×64 QR was measured at
    1 s instead of 20 ms): two passes to 1e-6 for a ``final`` basis, one to ``INTERMEDIATE_TOLERANCE``
    for a power iteration's (as on a GPU: :func:`_orth_unchecked`); Householder QR when the Gram
    matrix is too ill-conditioned (exactly low-rank sketches) or the result is not orthonormal enough.
    """
    q, ok = _cholesky_qr(y, passes=2 if final else 1, tolerance=1e-6 if final else INTERMEDIATE_TOLERANCE)
    if not bool(ok):
        q = torch.linalg.qr(y, mode="reduced")[0]
    return q


INTERMEDIATE_TOLERANCE = 1e-3  # ‖QᵀQ − I‖ of a power iteration's basis: one CholeskyQR pass is enough


def _orth_unchecked(y: torch.Tensor, checks: list[torch.Tensor], final: bool = True) -> torch.Tensor:
    """CholeskyQR without waiting to learn whether it worked: whether it did is appended to ``checks``
    (a device flag), for the caller to read once. A ``final`` basis (the range ``Q`` and ``Q2``) gets
    both passes and must be orthonormal to 1e-6; a power iteration's intermediate one only has to keep
    the sketch from collapsing onto the top singular vectors, so it gets one pass and must be
    orthonormal to ``INTERMEDIATE_TOLERANCE`` (in float64 that holds up to a condition number ~3e6).
    On a GPU host each Cholesky and triangular solve costs ~0.3 and ~0.2 ms of host time whatever the
    size (H100 profile): a third of the factorisations of a batch go."""
    q, ok = _cholesky_qr(y, passes=2 if final else 1, tolerance=1e-6 if final else INTERMEDIATE_TOLERANCE)
    checks.append(ok)
    return q


def _cholesky_qr(y: torch.Tensor, passes: int = 2, tolerance: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """CholeskyQR with ``passes`` passes (two: CholeskyQR2): (Q, whether every Cholesky factorisation
    succeeded and Q is orthonormal to ``tolerance``) — the flag stays on the device."""
    q = y.to(torch.float64)
    ok = torch.ones((), dtype=torch.bool, device=y.device)
    for _ in range(passes):
        chol, info = torch.linalg.cholesky_ex(q.mT @ q)
        ok = ok & (info == 0).all()
        q = torch.linalg.solve_triangular(chol, q.mT, upper=False).mT  # y · L⁻ᵀ
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    ok = ok & ((q.mT @ q - eye).abs().amax() < tolerance)  # NaN (a failed factorisation) compares False
    return q.to(torch.float32), ok


def _core_svd(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the small cores ``c [b, ℓ, ℓ]`` by the default driver (LAPACK on the CPU)."""
    return torch.linalg.svd(c, full_matrices=False)


CORE_TOLERANCE = 1e-6  # relative, in float64: the batched core SVD is redone by the default driver beyond it
SIGNIFICANT = 1e-4  # singular values below this × σ₁ do not need orthonormal left vectors (see below)


def _core_svd_batched(c: torch.Tensor, checks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the cores ``c [b, ℓ, ℓ]`` on a GPU in one batched call (cuSOLVER ``gesvda``, float64),
    with whether it holds appended to ``checks`` as a device flag: every value finite, the triplets
    rebuild ``c`` to ``CORE_TOLERANCE`` (relative Frobenius), ``V`` orthonormal and the left vectors
    of every singular value above ``SIGNIFICANT·σ₁`` orthonormal (``gesvda`` works from the Gram
    matrix, so those of near-zero singular values may not be, and they carry no weight: ``U·S·Vᵀ``
    stays ``c`` projected on ``V``'s span)."""
    c64 = c.to(torch.float64)
    try:
        with warnings.catch_warnings():  # torch warns before it raises; the redo is the answer to both
            warnings.simplefilter("ignore", UserWarning)
            u, s, vh = torch.linalg.svd(c64, full_matrices=False, driver="gesvda")
    except torch.linalg.LinAlgError:  # gesvda did not converge (a rank-deficient core): redo the batch
        checks.append(torch.zeros((), dtype=torch.bool, device=c.device))
        return c, torch.zeros(c.shape[:-1], dtype=c.dtype, device=c.device), c
    checks.append(core_holds(c64, u, s, vh))
    return u.to(c.dtype), s.to(c.dtype), vh.to(c.dtype)


def load_solvers(device: torch.device | str) -> None:
    """The GPU path's solver calls (CholeskyQR's Cholesky and triangular solve, the batched float64 core
    SVD) once, on a tiny batch: torch loads its CUDA linear-algebra library on the first of them, and
    extract's warm-up has that happen on a thread of its own, beside cuBLAS's first calls."""
    y = gaussian_sketch(96, 48, 0, ("load-solvers.0", "load-solvers.1"), device)  # torch's own random state untouched
    q, _ = _cholesky_qr(y, passes=1)
    _core_svd_batched(q.mT @ y, [])


def core_holds(c: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """Whether ``u·diag(s)·vh`` is an SVD of every ``c [b, ℓ, ℓ]`` good enough to truncate (a 0-d device
    bool; see :func:`_core_svd_batched`)."""
    eye = torch.eye(s.shape[-1], dtype=c.dtype, device=c.device)
    scale = torch.linalg.matrix_norm(c)
    rebuilt = torch.linalg.matrix_norm(c - (u * s.unsqueeze(-2)) @ vh) <= CORE_TOLERANCE * scale
    v_ok = (vh @ vh.mT - eye).abs().amax(dim=(-2, -1)) <= CORE_TOLERANCE
    big = (s > SIGNIFICANT * s[..., :1]).to(c.dtype)  # [b, ℓ]
    u_ok = ((u.mT @ u - eye) * big.unsqueeze(-1) * big.unsqueeze(-2)).abs().amax(dim=(-2, -1)) <= CORE_TOLERANCE
    descending = (s[..., :-1] >= s[..., 1:]).all(dim=-1) & (s[..., -1] >= 0)
    return (rebuilt & v_ok & u_ok & descending).all()  # NaN anywhere fails a comparison


def _range_finder_svd(x: torch.Tensor, width: int, niter: int, seed: int, names: Sequence[str], orth, core):
    """Tall ``x [b, M, N]``: the SVD of ``x`` restricted to a ``width``-dim sketched range."""
    omega = gaussian_sketch(x.shape[-1], width, seed, names, device=x.device)
    q = orth(x @ omega, final=niter == 0)  # [b, M, ℓ]
    xt = x.transpose(-1, -2)
    for i in range(int(niter)):
        q = orth(x @ orth(xt @ q, final=False), final=i == niter - 1)
    bt = xt @ q  # Bᵀ = Aᵀ Q [b, N, ℓ]
    q2 = orth(bt, final=True)
    r2 = q2.transpose(-1, -2) @ bt  # Bᵀ = Q2 R2, R2 [b, ℓ, ℓ] (upper triangular up to rounding)
    ur, s, vrh = core(r2.transpose(-1, -2))  # B = R2ᵀ Q2ᵀ
    u = q @ ur
    vh = vrh @ q2.transpose(-1, -2)
    return u, s, vh
