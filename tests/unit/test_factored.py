"""factored_svd against the float64 dense SVD of the product."""

from __future__ import annotations

import pytest
import torch

from loratool.linalg import factored_svd, split_singular, stack_factors, tail_energy


def _factors(out: int, rank: int, inn: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out, rank, generator=g)
    down = torch.randn(rank, inn, generator=g)
    return up, down


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    ("out", "rank", "inn"),
    [(64, 8, 48), (40, 16, 320), (320, 12, 40), (8, 20, 30), (30, 20, 8), (1, 3, 5)],
)
def test_matches_dense_float64_svd(out: int, rank: int, inn: int) -> None:
    up, down = _factors(out, rank, inn, seed=out * 1000 + inn)
    dense = up.double() @ down.double()
    s_ref = torch.linalg.svdvals(dense)
    u, s, vh = factored_svd(up, down)
    k = min(out, inn, rank)
    assert u.shape == (out, k) and s.shape == (k,) and vh.shape == (k, inn)
    assert u.dtype == torch.float32
    assert _rel(s, s_ref[:k]) < 1e-5
    assert _rel(u @ torch.diag(s) @ vh, dense) < 1e-5
    eye = torch.eye(k, dtype=torch.float64)
    assert _rel(u.double().T @ u.double(), eye) < 1e-5
    assert _rel(vh.double() @ vh.double().T, eye) < 1e-5
    assert bool((s[:-1] >= s[1:]).all()) and bool((s >= 0).all())


def test_float64_option_is_exact_to_float64() -> None:
    up, down = _factors(50, 6, 70, seed=3)
    dense = up.double() @ down.double()
    u, s, vh = factored_svd(up, down, dtype=torch.float64)
    assert s.dtype == torch.float64
    assert _rel(s, torch.linalg.svdvals(dense)[:6]) < 1e-12
    assert _rel(u @ torch.diag(s) @ vh, dense) < 1e-12


def test_truncation_is_the_dense_truncated_svd() -> None:
    up, down = _factors(60, 10, 45, seed=11)
    dense = up.double() @ down.double()
    ur, sr, vhr = torch.linalg.svd(dense, full_matrices=False)
    best4 = ur[:, :4] @ torch.diag(sr[:4]) @ vhr[:4]
    u, s, vh = factored_svd(up, down, rank=4)
    assert s.shape == (4,)
    approx = u.double() @ torch.diag(s.double()) @ vh.double()
    assert _rel(approx, best4) < 1e-5
    err = float((dense - approx).norm())
    assert err == pytest.approx(float(sr[4:].square().sum().sqrt()), rel=1e-5)


def test_rank_deficient_product() -> None:
    # Two rank-3 blocks stacked as rank 6 but built to be rank 3 overall.
    up, down = _factors(30, 3, 25, seed=5)
    ups, downs = stack_factors([(up, down), (2 * up, -down)])  # sum = -up@down: rank 3
    _, s, _ = factored_svd(ups, downs, dtype=torch.float64)
    assert float(s[3:].abs().max()) < 1e-10 * float(s[0])


def test_stack_factors_is_the_sum() -> None:
    a = _factors(20, 4, 30, seed=1)
    b = _factors(20, 7, 30, seed=2)
    ups, downs = stack_factors([a, b])
    assert ups.shape == (20, 11) and downs.shape == (11, 30)
    assert _rel(ups @ downs, a[0] @ a[1] + b[0] @ b[1]) < 1e-6


def test_split_singular_rebuilds_product() -> None:
    up, down = _factors(33, 5, 17, seed=9)
    new_up, new_down = split_singular(*factored_svd(up, down))
    assert _rel(new_up @ new_down, up @ down) < 1e-5
    assert _rel(new_up.norm(dim=0), new_down.norm(dim=1)) < 1e-5  # √S on each side


def test_tail_energy() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    tail, rel = tail_energy(s, 1)
    assert tail == pytest.approx(5**0.5)
    assert rel == pytest.approx(5**0.5 / 14**0.5)
    assert tail_energy(s, 4) == (0.0, 0.0)


def test_never_forms_the_product() -> None:
    # A dense 200k x 200k float32 product would need 160 GB; the factored SVD needs a few MB.
    up, down = _factors(200_000, 4, 200_000, seed=7)
    _, s, _ = factored_svd(up, down, dtype=torch.float64)
    # Reference: the singular values of up@down are those of the 4x4 (upᵀup)^½ (down downᵀ)^½ core.
    gram = (up.double().T @ up.double()) @ (down.double() @ down.double().T)
    ref = torch.linalg.eigvals(gram).real.clamp_min(0).sqrt().sort(descending=True).values
    assert _rel(s, ref) < 1e-8


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        factored_svd(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        factored_svd(torch.zeros(3, 2, 1), torch.zeros(2, 4))
