"""mix(): concat is the exact weighted sum, svd the Eckart–Young optimum, linear reports its error."""

from __future__ import annotations

import pytest
import torch

from loratool.core.modules import Adapter, Dora, LohaModule, LoraModule, NormModule
from loratool.errors import LoraToolError
from loratool.ops.mix import MixInput, mix

LIN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
LIN2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
CONV = "unet.down_blocks.0.resnets.0.conv1"
CONV1 = "unet.down_blocks.0.attentions.0.proj_in"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def _lora(key: str, shape: tuple[int, ...], rank: int, alpha: float | None, seed: int, *,
          tucker: bool = False, rslora: bool = False, dtype=torch.float32) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    comp, path = key.split(".", 1)
    out, inn = shape[0], shape[1]
    if len(shape) == 2:
        down, up, mid = torch.randn(rank, inn, generator=g), torch.randn(out, rank, generator=g), None
    elif tucker:
        down = torch.randn(rank, inn, 1, 1, generator=g)
        mid = torch.randn(rank, rank, *shape[2:], generator=g)
        up = torch.randn(out, rank, 1, 1, generator=g)
    else:
        down, up, mid = torch.randn(rank, inn, *shape[2:], generator=g), torch.randn(out, rank, 1, 1, generator=g), None
    return LoraModule(component=comp, path=path, alpha=alpha, down=down.to(dtype), up=up.to(dtype),
                      mid=None if mid is None else mid.to(dtype), rslora=rslora)


def _adapter(*mods, base: str = "sd1") -> Adapter:
    a = Adapter(base_model=base)
    for m in mods:
        a.add(m)
    return a


def _reference(inputs: list[MixInput]) -> dict[str, torch.Tensor]:
    """The obvious float64 weighted sum of dense deltas."""
    ref: dict[str, torch.Tensor] = {}
    for i in inputs:
        for k, m in i.adapter.modules.items():
            d = i.weight * m.delta(torch.float64)
            ref[k] = ref[k] + d.reshape(ref[k].shape) if k in ref else d
    return ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(b.shape), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def three_inputs() -> list[MixInput]:
    a = _adapter(_lora(LIN, (40, 32), 4, 2.0, 1), _lora(CONV, (16, 8, 3, 3), 4, 4.0, 2),
                 _lora(TE, (24, 24), 4, None, 3))
    b = _adapter(_lora(LIN, (40, 32), 8, 16.0, 4), _lora(CONV, (16, 8, 3, 3), 2, 1.0, 5, tucker=True),
                 _lora(LIN2, (40, 32), 6, 3.0, 6, rslora=True), _lora(CONV1, (12, 12, 1, 1), 3, 3.0, 7))
    c = _adapter(_lora(LIN, (40, 32), 2, 1.0, 8), _lora(CONV1, (12, 12, 1, 1), 5, 2.5, 9))
    return [MixInput(a, 0.7, name="a"), MixInput(b, -0.5, name="b"), MixInput(c, 1.3, name="c")]


def test_concat_is_the_exact_weighted_sum(three_inputs: list[MixInput]) -> None:
    res = mix(three_inputs)
    ref = _reference(three_inputs)
    assert sorted(res.adapter.modules) == sorted(ref)
    for key, want in ref.items():
        got = res.adapter.modules[key]
        assert got.weight_shape == tuple(want.shape)
        assert _rel(got.delta(torch.float64), want) < 2e-6, key
        assert got.alpha == got.rank  # scale 1
    ranks = {r.key: r.rank for r in res.modules}
    assert ranks[LIN] == 4 + 8 + 2 and ranks[CONV] == 4 + 2 and ranks[CONV1] == 3 + 5 and ranks[TE] == 4
    assert all(r.method == "concat" and r.rel_error == 0.0 for r in res.modules)


def test_concat_conv_factor_shapes(three_inputs: list[MixInput]) -> None:
    m = mix(three_inputs).adapter.modules[CONV]
    assert tuple(m.down.shape) == (6, 8, 3, 3) and tuple(m.up.shape) == (16, 6, 1, 1) and m.mid is None


def test_concat_balances_factors_and_keeps_sign() -> None:
    a = _adapter(_lora(LIN, (10, 10), 2, 2.0, 1))
    m = mix([MixInput(a, -4.0)]).adapter.modules[LIN]
    src = a.modules[LIN]
    # √|w·s| = √4 = 2 on both factors, sign on down
    assert torch.allclose(m.up, 2 * src.up) and torch.allclose(m.down, -2 * src.down)


def test_weight_zero_and_cancellation() -> None:
    a = _adapter(_lora(LIN, (20, 16), 3, 3.0, 1))
    res = mix([MixInput(a, 1.0), MixInput(a, -1.0)])
    assert float(res.adapter.modules[LIN].delta(torch.float64).abs().max()) < 1e-5


def test_svd_mode_is_the_truncated_svd_of_the_sum(three_inputs: list[MixInput]) -> None:
    rank = 5
    res = mix(three_inputs, mode="svd", rank=rank)
    ref = _reference(three_inputs)
    for rep in res.modules:
        want = ref[rep.key].reshape(ref[rep.key].shape[0], -1)
        u, s, vh = torch.linalg.svd(want, full_matrices=False)
        k = min(rank, int((s > s[0] * 1e-10).sum()))
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        got = res.adapter.modules[rep.key]
        assert got.rank == k
        assert _rel(got.delta(torch.float64), best) < 1e-5, rep.key
        eckart_young = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
        assert rep.rel_error == pytest.approx(eckart_young, rel=1e-4, abs=1e-6)
        assert rep.method == "svd"


def test_svd_mode_default_rank_is_the_largest_input_rank(three_inputs: list[MixInput]) -> None:
    res = mix(three_inputs, mode="svd")
    assert max(m.rank for m in res.adapter.modules.values()) == 8


def test_loha_input_is_decomposed_and_reported() -> None:
    g = torch.Generator().manual_seed(3)
    loha = LohaModule(component="unet", path=LIN.split(".", 1)[1], alpha=2.0,
                      w1a=torch.randn(40, 2, generator=g), w1b=torch.randn(2, 32, generator=g),
                      w2a=torch.randn(40, 2, generator=g), w2b=torch.randn(2, 32, generator=g))
    inputs = [MixInput(_adapter(_lora(LIN, (40, 32), 4, 4.0, 1)), 0.6), MixInput(_adapter(loha), 0.9)]
    ref = _reference(inputs)[LIN]
    res = mix(inputs)
    assert res.modules[0].method == "concat+factored"  # the LoHa's exact factors, never its dense ΔW
    assert _rel(res.adapter.modules[LIN].delta(torch.float64), ref) < 1e-5
    assert res.adapter.modules[LIN].rank <= 4 + 4  # LoHa of ranks 2x2 has rank <= 4
    assert not any("dense SVD" in w for w in res.warnings)
    svd = mix(inputs, mode="svd", rank=3)
    assert svd.modules[0].method == "factored-svd"
    s = torch.linalg.svdvals(ref)
    assert svd.modules[0].rel_error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4)
    # the dense path (kept as the reference) gives the same sum
    dense = mix(inputs, factored=False)
    assert dense.modules[0].method == "concat+svd" and any("dense SVD" in w for w in dense.warnings)
    assert _rel(dense.adapter.modules[LIN].delta(torch.float64), ref) < 1e-5


def test_linear_mode_reports_its_error() -> None:
    a = _adapter(_lora(LIN, (30, 20), 4, 4.0, 1))
    b = _adapter(_lora(LIN, (30, 20), 4, 2.0, 2))
    inputs = [MixInput(a, 0.5), MixInput(b, -0.8)]
    res = mix(inputs, mode="linear")
    m = res.adapter.modules[LIN]
    sa, sb = 0.5 * 1.0, -0.8 * 0.5
    up = abs(sa) ** 0.5 * a.modules[LIN].up + abs(sb) ** 0.5 * b.modules[LIN].up
    down = abs(sa) ** 0.5 * a.modules[LIN].down - abs(sb) ** 0.5 * b.modules[LIN].down
    assert _rel(m.delta(torch.float64), up.double() @ down.double()) < 1e-6
    ref = _reference(inputs)[LIN]
    assert res.modules[0].rel_error == pytest.approx(_rel(m.delta(torch.float64), ref), rel=1e-6)
    assert res.modules[0].rel_error > 0.1  # independent LoRAs: cross terms are large
    assert any("not the weighted sum" in w for w in res.warnings)
    # a single input at weight w is applied once, not squared
    one = mix([MixInput(a, 0.5)], mode="linear").adapter.modules[LIN]
    assert _rel(one.delta(torch.float64), 0.5 * a.modules[LIN].delta(torch.float64)) < 1e-6


def test_linear_mode_refuses_unequal_ranks() -> None:
    a = _adapter(_lora(LIN, (30, 20), 4, 4.0, 1))
    b = _adapter(_lora(LIN, (30, 20), 8, 2.0, 2))
    with pytest.raises(LoraToolError, match="equal ranks"):
        mix([MixInput(a), MixInput(b)], mode="linear")


def test_refuses_dora_and_other_base_models() -> None:
    m = _lora(LIN, (10, 8), 2, 2.0, 1)
    m.dora = Dora(magnitude=torch.ones(10, 1), axis="out")
    with pytest.raises(LoraToolError, match="DoRA"):
        mix([MixInput(_adapter(m))])
    a = _adapter(_lora(LIN, (10, 8), 2, 2.0, 1), base="sd1")
    b = _adapter(_lora(LIN, (10, 8), 2, 2.0, 2), base="sdxl")
    with pytest.raises(LoraToolError, match="different base models"):
        mix([MixInput(a, name="a"), MixInput(b, name="b")])
    c = _adapter(_lora(LIN, (12, 8), 2, 2.0, 2), base="unknown")
    with pytest.raises(LoraToolError, match="not for the same model"):
        mix([MixInput(a), MixInput(c)])


def test_norm_modules_are_summed() -> None:
    n1 = NormModule(component="unet", path="conv_norm_out", w_norm=torch.ones(8))
    n2 = NormModule(component="unet", path="conv_norm_out", w_norm=torch.arange(8.0))
    res = mix([MixInput(_adapter(n1), 0.5), MixInput(_adapter(n2), 2.0)])
    assert torch.allclose(res.adapter.modules["unet.conv_norm_out"].w_norm, 0.5 + 2 * torch.arange(8.0))


def test_dtype_follows_inputs_and_output_is_deterministic() -> None:
    a = _adapter(_lora(LIN, (10, 8), 2, 2.0, 1, dtype=torch.float16))
    b = _adapter(_lora(LIN, (10, 8), 3, 2.0, 2, dtype=torch.float16))
    r1 = mix([MixInput(a, 0.3), MixInput(b, 0.4)], mode="svd", rank=2)
    r2 = mix([MixInput(a, 0.3), MixInput(b, 0.4)], mode="svd", rank=2)
    m1, m2 = r1.adapter.modules[LIN], r2.adapter.modules[LIN]
    assert m1.up.dtype == torch.float16
    assert torch.equal(m1.up, m2.up) and torch.equal(m1.down, m2.down)


def test_bad_arguments() -> None:
    a = _adapter(_lora(LIN, (10, 8), 2, 2.0, 1))
    with pytest.raises(LoraToolError, match="unknown mix mode"):
        mix([MixInput(a)], mode="ties")
    with pytest.raises(LoraToolError, match="nothing to mix"):
        mix([])
    with pytest.raises(LoraToolError, match="rank"):
        mix([MixInput(a)], mode="svd", rank=0)
