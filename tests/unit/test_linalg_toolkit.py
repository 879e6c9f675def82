"""The low-rank toolkit beyond the SVD engine: the √S split, factored norms, the Gram top-k, numerical
rank, structured factorisations; each against a slow, obvious float64 reference. And the rule that
no decomposition lives outside loratool/linalg."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from loratool.core.modules import LohaModule, LokrModule, LoraModule
from loratool.linalg import (
    fold_core,
    numerical_rank,
    product_norm,
    product_sq_norm,
    split_coefficient,
    split_singular,
    thin_svd,
    top_singular,
)
from loratool.linalg.structured import structured_factors


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_split_singular_in_a_dtype_and_clamps_rounding_noise() -> None:
    a = torch.randn(20, 12, generator=_g(), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    up, down = split_singular(u, s, vh, dtype=torch.float32)
    assert up.dtype == down.dtype == torch.float32
    assert float((up.double() @ down.double() - a).norm() / a.norm()) < 1e-6
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-5)  # √S on each side
    s_neg = s.clone()
    s_neg[-1] = -1e-20
    up, down = split_singular(u, s_neg, vh)
    assert bool(torch.isfinite(up).all()) and float(up[:, -1].abs().max()) == 0.0


@pytest.mark.parametrize("coef", [2.25, -0.5, 0.0])
def test_split_coefficient(coef: float) -> None:
    for side in ("up", "down"):
        a, b = split_coefficient(coef, sign_on=side)
        assert a * b == pytest.approx(coef) and abs(a) == pytest.approx(abs(b))
        assert (a if side == "up" else b) <= 0 if coef < 0 else a >= 0 and b >= 0


def test_product_norms_against_the_dense_product() -> None:
    up, down = torch.randn(40, 6, generator=_g(1)), torch.randn(6, 30, generator=_g(2))
    dense = up.double() @ down.double()
    assert product_sq_norm(up, down) == pytest.approx(float(dense.square().sum()), rel=1e-12)
    assert product_norm(up, down, dtype=torch.float64) == pytest.approx(float(dense.norm()), rel=1e-12)
    assert product_norm(up, down) == pytest.approx(float(dense.norm()), rel=1e-5)  # float32 Grams
    high = torch.randn(8, 8, generator=_g(3)), torch.randn(8, 9, generator=_g(4))  # rank ≈ size: product path
    assert product_norm(*high, dtype=torch.float64) == pytest.approx(float((high[0].double() @ high[1].double()).norm()))
    mid = torch.randn(6, 5, 3, 3, generator=_g(5), dtype=torch.float64)  # Tucker core, not square
    down5 = torch.randn(5, 30, generator=_g(6), dtype=torch.float64)
    dense_t = torch.einsum("ijhw,oi,jc->ochw", mid, up.double(), down5)
    assert product_norm(up, down5, mid, dtype=torch.float64) == pytest.approx(float(dense_t.norm()), rel=1e-12)
    folded = fold_core(mid, down5)
    assert torch.allclose(up.double() @ folded.reshape(6, -1), dense_t.reshape(40, -1))


@pytest.mark.parametrize("shape", [(30, 200), (200, 30)])
def test_top_singular_is_the_leading_svd(shape) -> None:
    g = _g(7)
    a = torch.randn(shape[0], 4, generator=g, dtype=torch.float64) @ torch.randn(4, shape[1], generator=g,
                                                                               dtype=torch.float64)
    u, s, vh = top_singular(a, 16)
    assert torch.allclose(s[:4], torch.linalg.svdvals(a)[:4], rtol=1e-10)
    assert float(s[4:].max()) < 1e-6 * float(s[0])  # the Gram route's noise floor, not more
    assert float((u @ torch.diag(s) @ vh - a).norm() / a.norm()) < 1e-10
    u2, s2, _ = top_singular(a, 2)
    assert s2.shape == (2,) and u2.shape == (shape[0], 2)
    _, s0, _ = top_singular(torch.zeros(shape, dtype=torch.float64), 3)
    assert s0.shape == (1,) and float(s0[0]) == 0.0


def test_thin_svd_and_numerical_rank() -> None:
    a = torch.randn(9, 5, generator=_g(8))
    u, s, vh = thin_svd(a)
    assert u.shape == (9, 5) and torch.allclose(u @ torch.diag(s) @ vh, a, atol=1e-5)
    s = torch.tensor([4.0, 1.0, 1e-7, 0.0])
    assert numerical_rank(s, 1e-6) == 2 and numerical_rank(s, 1e-9) == 3
    assert numerical_rank(torch.zeros(3), 1e-6) == 0 and numerical_rank(torch.zeros(0), 1e-6) == 0


def test_structured_factors_are_exact() -> None:
    g = _g(9)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    modules = [
        LoraModule("unet", "a", alpha=3.0, down=r(4, 10), up=r(8, 4)),
        LoraModule("unet", "c", alpha=2.0, down=r(3, 5, 1, 1), up=r(6, 4, 1, 1), mid=r(4, 3, 3, 3)),
        LohaModule("unet", "b", alpha=2.0, w1a=r(8, 2), w1b=r(2, 10), w2a=r(8, 3), w2b=r(3, 10)),
        LokrModule("unet", "k", alpha=None, w1=r(2, 5), w2a=r(4, 2), w2b=r(2, 2)),
    ]
    for m in modules:
        up, down = structured_factors(m)
        want = m.delta(torch.float64).reshape(m.weight_shape[0], -1)
        assert float((up @ down - want).norm() / want.norm()) < 1e-12, m.path


ALLOWED = {"loratool/train/layers.py"}  # TriLoRA init/fold: train/ is reworked separately (issue 18)


def test_no_decomposition_outside_linalg() -> None:
    """SVDs, eigendecompositions and the √S split live in loratool/linalg only."""
    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"linalg\.(svd|svdvals|eigh|eigvalsh|eig)\(|\.sqrt\(\)\[|root\[:, None\]")
    found = []
    for path in sorted((root / "loratool").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("loratool/linalg/") or rel in ALLOWED:
            continue
        found += [f"{rel}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
