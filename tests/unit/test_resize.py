"""resize: the result is the optimal truncation of the input's ΔW, computed without densifying."""

from __future__ import annotations

import pytest
import torch

from loratool.core.modules import Adapter, Dora, FullModule, LohaModule, LoraModule, NormModule
from loratool.linalg import parse_rank_mode
from loratool.ops.resize import ResizeOptions, resize


def lora(path, out, inp, r, gen, alpha=None, kernel=(), rslora=False, dtype=torch.float32):
    down = torch.randn(r, inp, *kernel, generator=gen) / inp**0.5
    up = torch.randn(out, r, *((1, 1) if kernel else ()), generator=gen)
    return LoraModule(component="unet", path=path, alpha=alpha, down=down.to(dtype), up=up.to(dtype), rslora=rslora)


def best_truncation(delta: torch.Tensor, k: int) -> torch.Tensor:
    d = delta.to(torch.float64).reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def adapter_of(*modules):
    a = Adapter(metadata={"ss_network_dim": "32"}, base_model="sdxl")
    for m in modules:
        a.add(m)
    return a


def test_resize_is_the_optimal_truncation_and_keeps_the_scale(gen):
    mods = [lora("lin", 320, 640, 32, gen, alpha=16.0), lora("conv", 64, 32, 24, gen, alpha=4.0, kernel=(3, 3)),
            lora("rs", 128, 96, 16, gen, alpha=8.0, rslora=True), lora("noalpha", 80, 80, 12, gen)]
    src = adapter_of(*mods)
    res = resize(src, ResizeOptions(rank=8, conv_rank=4))
    for old in mods:
        new = res.adapter.modules[old.key]
        k = 4 if old.path == "conv" else 8
        assert new.rank == k and new.mid is None and not new.rslora
        assert new.scale == pytest.approx(old.scale, rel=1e-12)
        want = best_truncation(old.delta(torch.float64), k)
        got = new.delta(torch.float64).reshape(want.shape)
        assert float((got - want).norm() / want.norm()) < 1e-5
        assert new.weight_shape == old.weight_shape
    rep = {r.key: r for r in res.reports}
    s = torch.linalg.svdvals(mods[0].delta(torch.float64))
    assert rep["unet.lin"].retained == pytest.approx(float(s[:8].square().sum() / s.square().sum()), rel=1e-5)
    assert rep["unet.lin"].old_rank == 32 and rep["unet.lin"].method == "factored"
    assert src.modules["unet.lin"] is mods[0] and mods[0].rank == 32  # input untouched


def test_resize_never_densifies_a_lora(gen, monkeypatch):
    src = adapter_of(lora("lin", 1280, 1280, 64, gen, alpha=64.0))

    def boom(*_a, **_k):
        raise AssertionError("densified")

    monkeypatch.setattr(LoraModule, "product", boom)
    monkeypatch.setattr(LoraModule, "delta", boom)
    res = resize(src, ResizeOptions(rank=16))
    assert res.adapter.modules["unet.lin"].rank == 16


def test_dynamic_ranks_are_minimal(gen):
    old = lora("lin", 200, 300, 24, gen, alpha=24.0)
    s = torch.linalg.svdvals(old.delta(torch.float64))
    energy = (s.square().cumsum(0) / s.square().sum()).tolist()
    res = resize(adapter_of(old), ResizeOptions(rank=24, rank_mode=parse_rank_mode("fro:0.8")))
    k = res.adapter.modules["unet.lin"].rank
    assert energy[k - 1] >= 0.64 and (k == 1 or energy[k - 2] < 0.64)
    res = resize(adapter_of(old), ResizeOptions(rank=3, rank_mode=parse_rank_mode("fro:0.99")))
    assert res.adapter.modules["unet.lin"].rank == 3  # capped by -r
    res = resize(adapter_of(old), ResizeOptions(rank=100))
    assert res.adapter.modules["unet.lin"].rank == 24  # never above the old rank


def test_lycoris_kinds_on_their_factors_full_diffs_through_their_dense_delta(gen):
    loha = LohaModule(component="unet", path="loha", alpha=4.0, w1a=torch.randn(64, 4, generator=gen),
                      w1b=torch.randn(4, 96, generator=gen), w2a=torch.randn(64, 4, generator=gen),
                      w2b=torch.randn(4, 96, generator=gen))
    full = FullModule(component="unet", path="full", diff=torch.randn(48, 72, generator=gen))
    norm = NormModule(component="unet", path="norm", w_norm=torch.randn(48, generator=gen))
    res = resize(adapter_of(loha, full, norm), ResizeOptions(rank=8))
    for old in (loha, full):
        new = res.adapter.modules[old.key]
        assert isinstance(new, LoraModule) and new.rank == 8
        want = best_truncation(old.delta(torch.float64), 8)
        opt = float((old.delta(torch.float64) - want).norm())
        assert float((old.delta(torch.float64) - new.delta(torch.float64)).norm()) <= 1.01 * opt + 1e-9
    assert res.adapter.modules["unet.norm"] is norm
    assert res.summary["dense"] == ["unet.full"]  # the LoHa's exact factors: never its dense ΔW


def test_dora_magnitude_and_bias_are_kept_and_dtype_follows_input(gen):
    old = lora("lin", 64, 80, 16, gen, alpha=16.0, dtype=torch.float16)
    old.dora = Dora(magnitude=torch.rand(64, 1, generator=gen), axis="out")
    old.bias = torch.randn(64, generator=gen)
    new = resize(adapter_of(old), ResizeOptions(rank=4)).adapter.modules["unet.lin"]
    assert new.dora is old.dora and new.bias is old.bias
    assert new.down.dtype == torch.float16
    new = resize(adapter_of(old), ResizeOptions(rank=4, dtype="bf16")).adapter.modules["unet.lin"]
    assert new.up.dtype == torch.bfloat16


def test_zero_module_gives_rank_one_without_nans(gen):
    z = LoraModule(component="unet", path="z", alpha=8.0, down=torch.zeros(8, 40), up=torch.zeros(30, 8))
    new = resize(adapter_of(z), ResizeOptions(rank=4, rank_mode=parse_rank_mode("fro:0.9"))).adapter.modules["unet.z"]
    assert new.rank == 1 and torch.isfinite(new.down).all() and float(new.delta().abs().max()) == 0
