"""Rank selection returns the minimal rank meeting the target (not kohya's +1), and the clamp."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.errors import LoraToolError
from loratool.linalg import clamp_factors, decompose, parse_rank_mode, quantile, select_rank
from loratool.linalg.rank import RankMode

S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])


def test_documented_example_is_minimal():
    # kohya gives 3 / 2 / 3 for these (reference/kohya.md §3.3)
    assert select_rank(S, parse_rank_mode("fro:0.9"), 6) == 2
    assert select_rank(S, parse_rank_mode("fro:0.8"), 6) == 1
    assert select_rank(S, parse_rank_mode("ratio:4"), 6) == 2
    assert select_rank(S, parse_rank_mode("cumulative:0.5"), 6) == 1
    assert select_rank(S, parse_rank_mode("fixed"), 4) == 4
    assert select_rank(S, parse_rank_mode("fro:1"), 3) == 3  # capped


spectra = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=20).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64))


@settings(max_examples=80, deadline=None)
@given(spectra, st.floats(0.05, 1.0), st.floats(1.0, 50.0))
def test_dynamic_modes_return_the_minimal_rank(s, t, ratio):
    n = s.numel()
    energy = [float(s[:k].square().sum() / s.square().sum()) for k in range(n + 1)]
    k = select_rank(s, RankMode("fro", t), n)
    assert energy[k] >= t * t * (1 - 1e-9) and (k == 1 or energy[k - 1] < t * t)
    cum = [float(s[:k].sum() / s.sum()) for k in range(n + 1)]
    k = select_rank(s, RankMode("cumulative", t), n)
    assert cum[k] >= t * (1 - 1e-9) and (k == 1 or cum[k - 1] < t)
    k = select_rank(s, RankMode("ratio", ratio), n)
    assert k == max(1, sum(1 for x in s.tolist() if x > s[0].item() / ratio))


def test_fro_uses_the_true_norm_with_a_truncated_spectrum():
    # only the top 2 values are known; the rest of the energy (1² + .5² + .1²) still counts
    total = float(S.square().sum())
    assert select_rank(S[:2], RankMode("fro", 0.999), 6, total_sq=total) == 2  # target unreachable: cap
    assert select_rank(S[:2], RankMode("fro", 0.95), 6, total_sq=total) == 2


def test_cumulative_in_decompose_uses_the_whole_spectrum():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(200, 260, generator=gen)
    s_all = torch.linalg.svdvals(a.double())
    target = 0.3
    want = int((s_all.cumsum(0) / s_all.sum() < target).sum()) + 1
    (t,) = decompose(a, ["m"], 64, mode=RankMode("cumulative", target))
    assert t.rank == min(want, 64)


@pytest.mark.parametrize("text", ["fro", "fro:2", "ratio:0.5", "bogus:1", "cumulative:x", "ratio:inf"])
def test_bad_rank_modes_are_one_clear_error(text):
    with pytest.raises(LoraToolError):
        parse_rank_mode(text)


def test_quantile_matches_torch_and_clamp_is_off_at_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10001, generator=gen)
    for q in (0.0, 0.5, 0.99, 0.999, 1.0):
        assert quantile(x, q) == pytest.approx(float(torch.quantile(x, q)), rel=1e-6, abs=1e-6)
    up, down = torch.randn(50, 4, generator=gen), torch.randn(4, 70, generator=gen)
    cu, cd = clamp_factors(up, down, 1.0)
    assert cu is up and cd is down
    cu, cd = clamp_factors(up, down, 0.9)
    hi = float(torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.9))
    assert float(cu.max()) == pytest.approx(hi, rel=1e-6) and float(cd.min()) >= -hi * (1 + 1e-6)


def test_quantile_past_torch_2_pow_24_limit():
    n = (1 << 24) + 3
    x = torch.arange(n, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)
    assert quantile(x, 0.5) == pytest.approx((n - 1) / 2)
