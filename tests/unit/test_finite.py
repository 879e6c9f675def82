"""core/finite.all_finite: the chunked sum with an element-wise look only where the sum is not finite."""

from __future__ import annotations

import pytest
import torch

from loratool.core import finite
from loratool.core.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn, torch.complex64])
def test_huge_but_finite_is_finite_and_any_bad_element_is_not(dtype, monkeypatch) -> None:
    monkeypatch.setattr(finite, "CHUNK", 64)  # several chunks, the bad element in the last
    real = torch.float32 if dtype.is_complex else dtype
    big = torch.full((300,), torch.finfo(real).max, dtype=torch.float64).to(dtype)
    assert all_finite(big)  # its sum overflows: the element-wise look must clear it
    bad_values = [float("nan")] if dtype == torch.float8_e4m3fn else [float("nan"), float("inf"), float("-inf")]
    for bad in bad_values:
        t = torch.zeros(300, dtype=dtype)
        t[297] = bad
        assert not all_finite(t), (dtype, bad)


def test_integers_and_empty_tensors_are_finite() -> None:
    assert all_finite(torch.arange(10))
    assert all_finite(torch.empty(0))


def test_the_check_runs_on_one_thread_and_gives_the_count_back(monkeypatch) -> None:
    seen = []
    real_sum = torch.sum

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_sum(*args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch, "sum", spy)
        t = torch.zeros(1000)
        assert all_finite(t)
        t[3] = float("nan")
        assert not all_finite(t)  # the early return restores the count too
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
