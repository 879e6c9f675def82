"""The SVD engine against a slow, obvious float64 reference (Eckart–Young via a full SVD)."""

from __future__ import annotations

import pytest
import torch

from loratool.errors import LoraToolError
from loratool.linalg import SvdPolicy, decompose, exact_svd, randomized_svd
from loratool.linalg.seeding import gaussian_sketch, module_seed


def orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = s.numel()
    return orthonormal(m, k, gen) @ torch.diag(s.to(torch.float64)) @ orthonormal(n, k, gen).T


def optimal_error(a: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(a.to(torch.float64))
    return float(s[k:].square().sum().sqrt())


def rebuild_error(a: torch.Tensor, u, s, vh) -> float:
    approx = u.to(torch.float64) @ torch.diag(s.to(torch.float64)) @ vh.to(torch.float64)
    return float((a.to(torch.float64) - approx).norm())


def test_exact_low_rank_is_recovered():
    a = with_spectrum(200, 300, torch.tensor([9.0, 5.0, 3.0, 2.0, 1.0]))
    for rank in (5, 8):
        u, s, vh = randomized_svd(a.float(), rank, names=["m"], seed=1)
        assert rebuild_error(a, u, s, vh) / float(a.norm()) < 1e-5
        u, s, vh = exact_svd(a, rank)
        assert rebuild_error(a, u, s, vh) / float(a.norm()) < 1e-10


@pytest.mark.parametrize("shape", [(320, 320), (256, 1152), (640, 160), (300, 700)])
def test_randomized_within_one_percent_of_optimal_on_slow_decay(shape):
    m, n = shape
    p = min(m, n)
    gen = torch.Generator().manual_seed(3)
    s = torch.arange(1, p + 1, dtype=torch.float64) ** -0.5
    a = with_spectrum(m, n, s, seed=4) + 1e-3 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    for rank in (16, 32):
        u, s_r, vh = randomized_svd(a.float(), rank, names=["layer"], seed=0, niter=2)
        assert u.dtype == torch.float32 and s_r.shape == (rank,)
        assert rebuild_error(a, u, s_r, vh) <= 1.01 * optimal_error(a, rank)


def test_exact_matches_full_svd_and_is_orthonormal():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 40, 90, generator=gen, dtype=torch.float64)
    u, s, vh = exact_svd(a, 10)
    ref = torch.linalg.svdvals(a)[:, :10]
    torch.testing.assert_close(s, ref, rtol=1e-10, atol=1e-12)
    eye = torch.eye(10, dtype=torch.float64).expand(3, 10, 10)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(vh @ vh.transpose(-1, -2), eye, atol=1e-10, rtol=0)
    for i in range(3):
        assert rebuild_error(a[i], u[i], s[i], vh[i]) == pytest.approx(optimal_error(a[i], 10), rel=1e-9)


def test_exact_falls_back_when_the_spectrum_is_too_wide_for_the_gram_route():
    s = torch.tensor([1.0, 1e-3, 1e-9, 1e-12], dtype=torch.float64)
    a = with_spectrum(50, 60, s)
    u, s_e, vh = exact_svd(a, 4)
    torch.testing.assert_close(s_e, s, rtol=1e-3, atol=1e-15)
    assert rebuild_error(a, u, s_e, vh) < 1e-12


def test_randomized_is_deterministic_and_batch_independent():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(4, 96, 160, generator=gen)
    names = [f"block.{i}" for i in range(4)]
    u1, s1, v1 = randomized_svd(a, 8, names=names, seed=7)
    u2, s2, v2 = randomized_svd(a, 8, names=names, seed=7)
    assert torch.equal(u1, u2) and torch.equal(s1, s2) and torch.equal(v1, v2)
    u3, s3, v3 = randomized_svd(a[2], 8, names=[names[2]], seed=7)
    torch.testing.assert_close(s3, s1[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u3, u1[2], rtol=0, atol=2e-3)  # same signs, not mirror images
    assert module_seed(7, "a") != module_seed(7, "b") and module_seed(7, "a") != module_seed(8, "a")
    sk = gaussian_sketch(5, 3, 7, ["a", "b"])
    assert not torch.equal(sk[0], sk[1]) and torch.equal(sk, gaussian_sketch(5, 3, 7, ["a", "b"]))


def test_bf16_and_fp16_inputs_are_decomposed_in_float32():
    a = with_spectrum(128, 256, torch.linspace(4, 1, 12)).to(torch.bfloat16)
    for t in (a, a.to(torch.float16)):
        u, s, vh = randomized_svd(t, 12, names=["x"])
        assert u.dtype == torch.float32
        assert rebuild_error(t.float(), u, s, vh) <= 1.01 * optimal_error(t.float(), 12)


def test_zero_matrix_gives_zero_spectrum_and_no_nans():
    z = torch.zeros(2, 64, 32)
    for policy in (SvdPolicy(), SvdPolicy(method="exact")):
        out = decompose(z, ["a", "b"], 8, policy=policy)
        for t in out:
            assert t.rank == 1 and float(t.s.abs().max()) == 0.0
            assert torch.isfinite(t.u).all() and torch.isfinite(t.vh).all()
            assert t.retained == 1.0


def test_policy_uses_exact_for_tiny_layers_and_reports_retained_energy():
    a = with_spectrum(16, 24, torch.tensor([3.0, 2.0, 1.0, 0.5])).float()
    (t,) = decompose(a, ["tiny"], 2)
    assert t.method == "exact" and t.rank == 2
    assert t.retained == pytest.approx((9 + 4) / (9 + 4 + 1 + 0.25), rel=1e-6)
    big = with_spectrum(300, 400, torch.arange(1, 301, dtype=torch.float64) ** -0.7).float()
    (t,) = decompose(big, ["big"], 8)
    assert t.method == "randomized"
    assert t.retained == pytest.approx(float(torch.linalg.svdvals(big.double())[:8].square().sum()
                                             / big.double().square().sum()), rel=1e-3)


def _gram_svd_of(c: torch.Tensor):
    """An SVD the way a Gram-matrix solver makes one: V from eigh(cᵀc), U = c·V / σ (so the left vectors
    of zero singular values are not orthonormal)."""
    evals, v = torch.linalg.eigh(c.mT @ c)
    evals, v = evals.flip(-1).clamp_min(0), v.flip(-1)
    s = evals.sqrt()
    u = (c @ v) / s.clamp_min(1e-12).unsqueeze(-2)
    return u, s, v.mT


def test_the_core_svd_check_passes_a_true_svd_and_a_gram_svd_of_a_low_rank_core():
    from loratool.linalg.randomized import core_holds

    gen = torch.Generator().manual_seed(3)
    full = torch.randn(4, 24, 24, generator=gen, dtype=torch.float64)
    assert bool(core_holds(full, *torch.linalg.svd(full)))
    low = torch.randn(4, 24, 5, generator=gen, dtype=torch.float64) @ torch.randn(4, 5, 24, generator=gen,
                                                                                 dtype=torch.float64)
    u, s, vh = _gram_svd_of(low)
    assert float((u.mT @ u - torch.eye(24, dtype=torch.float64)).abs().max()) > 1e-3  # the tail is not orthonormal
    assert bool(core_holds(low, u, s, vh))
    zero = torch.zeros(2, 24, 24, dtype=torch.float64)
    assert bool(core_holds(zero, torch.eye(24, dtype=torch.float64).expand(2, 24, 24), torch.zeros(2, 24),
                           torch.eye(24, dtype=torch.float64).expand(2, 24, 24)))


@pytest.mark.parametrize("damage", ["u", "v", "s_order", "nan", "rebuild"])
def test_the_core_svd_check_refuses_a_damaged_svd(damage):
    from loratool.linalg.randomized import core_holds

    gen = torch.Generator().manual_seed(4)
    c = torch.randn(3, 16, 16, generator=gen, dtype=torch.float64)
    u, s, vh = (x.clone() for x in torch.linalg.svd(c))
    if damage == "u":  # two leading left vectors mixed: still rebuilt, not orthonormal
        u[1, :, 0] += 1e-3 * u[1, :, 1]
    elif damage == "v":
        vh[2, 3] *= 1.001
    elif damage == "s_order":
        s[0] = s.flip(-1)[0].clone()
        s[0, 0], s[0, 1] = s[0, 1].clone(), s[0, 0].clone()
    elif damage == "nan":
        u[0, 5, 5] = float("nan")
    else:
        s[1, 0] *= 1.01
    assert not bool(core_holds(c, u, s, vh))


@pytest.mark.parametrize("shape,decay", [((1280, 320), 0.5), ((2048, 640), 0.8), ((640, 2880), 1.5)])
def test_one_pass_intermediate_bases_lose_nothing_against_two(shape, decay):
    """Power iterations orthonormalise with one CholeskyQR pass (here against two for every basis):
    the truncation is as good, and every check holds."""
    from loratool.linalg.randomized import _core_svd, _orth, _orth_unchecked, _range_finder_svd

    m, n = shape
    a = torch.stack([with_spectrum(m, n, torch.arange(1, min(m, n) + 1) ** -decay, seed=i) for i in range(2)])
    x = a.float() if m >= n else a.float().mT
    checks: list[torch.Tensor] = []
    fast = _range_finder_svd(x, 64, 2, 0, ["p", "q"], lambda y, final: _orth_unchecked(y, checks, final), _core_svd)
    full = _range_finder_svd(x, 64, 2, 0, ["p", "q"], lambda y, final: _orth(y), _core_svd)  # two passes each
    assert bool(torch.stack(checks).all())
    for i in range(2):
        errs = [rebuild_error(x[i], u[i, :, :32], s[i, :32], vh[i, :32]) for u, s, vh in (fast, full)]
        assert errs[0] <= errs[1] * (1 + 1e-4)
        assert errs[0] <= 1.01 * optimal_error(x[i], 32)


def test_a_finite_batch_whose_norm_overflows_float32_gets_its_true_norm_and_is_not_refused():
    """Norms are taken in float32 (no float64 copy of the batch); one that overflows is taken again in
    float64, so a finite matrix of huge values is measured, not mistaken for one holding inf."""
    from loratool.linalg import decompose_batch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 120, 3, generator=gen, dtype=torch.float64) @ torch.randn(2, 3, 90, generator=gen,
                                                                                   dtype=torch.float64)
    a = a / a.abs().amax() * 1e37  # every value finite in float32, the norm (~1e39) past its range
    x = a.float()
    assert not torch.isfinite(torch.linalg.vector_norm(x[0], dtype=torch.float32))
    tr = decompose_batch(x, ["x", "y"], 3)
    want = torch.linalg.vector_norm(x.double(), dim=(1, 2)).square()
    assert tr.totals_sq == pytest.approx(want.tolist(), rel=1e-9)
    assert all(0.999 < tr.retained(i) <= 1 for i in range(2))
    nan = x.clone()
    nan[1, 5, 5] = float("nan")
    with pytest.raises(LoraToolError, match="y: holds NaN"):
        decompose_batch(nan, ["x", "y"], 3)
