"""ops.convert on canonical adapters: what each module becomes, checked against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from loratool.core.modules import Adapter, Dora, FullModule, LohaModule, LokrModule, LoraModule, NormModule
from loratool.errors import LoraToolError
from loratool.ops.convert import convert
from loratool.ops.convert_math import fold_scale, fold_tucker, lower_to_lora

G = torch.Generator().manual_seed(7)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def lora(path: str = "down_blocks.0.attentions.0.proj_in", *, rank: int = 4, alpha: float | None = 2.0,
         out: int = 24, inp: int = 16, conv: bool = False, **kw) -> LoraModule:
    if conv:
        return LoraModule("unet", path, alpha=alpha, down=rnd(rank, inp, 3, 3), up=rnd(out, rank, 1, 1), **kw)
    return LoraModule("unet", path, alpha=alpha, down=rnd(rank, inp), up=rnd(out, rank), **kw)


def adapter(*modules, unknown=()) -> Adapter:
    a = Adapter(base_model="sd1", source_format="kohya", unknown=list(unknown))
    for m in modules:
        a.add(m)
    return a


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("to", ["kohya", "webui", "comfyui", "diffusers", "peft"])
def test_plain_lora_is_a_rename_with_the_same_tensors(to):
    m = lora()
    out, report = convert(adapter(m), to)
    (got,) = out.modules.values()
    assert got.down is m.down and got.up is m.up and got.alpha == m.alpha
    assert report.counts() == {"rename": 1} and report.exact
    assert report.target == "kohya" if to in ("webui", "comfyui") else to


def test_unknown_format_is_refused_with_the_choices():
    with pytest.raises(LoraToolError, match="unknown output format 'ckpt'.*kohya"):
        convert(adapter(lora()), "ckpt")


def test_rslora_becomes_plain_alpha_for_kohya():
    m = lora(rank=9, alpha=6.0, rslora=True)
    out, report = convert(adapter(m), "kohya")
    got = out.modules[m.key]
    assert not got.rslora and got.alpha == pytest.approx(6.0 * 3.0)
    assert got.down is m.down  # no tensor touched
    assert rel(got.delta(torch.float64), m.delta(torch.float64)) < 1e-12
    assert report.changes[0].action == "unfold-rslora"
    kept, _ = convert(adapter(m), "diffusers")
    assert kept.modules[m.key].rslora


@pytest.mark.parametrize("alpha", [1.0, -3.0, 0.25])
def test_scale_folded_as_square_root_on_both_factors_where_no_alpha_fits(alpha):
    m = lora(rank=4, alpha=alpha)
    out, report = convert(adapter(m), "diffusers-old")  # an SD layout without alpha
    got = out.modules[m.key]
    assert got.alpha is None and got.scale == 1.0
    assert rel(got.delta(torch.float64), m.delta(torch.float64)) < 1e-6
    root = math.sqrt(abs(alpha / 4))
    assert torch.allclose(got.down, m.down * root, rtol=1e-6)
    assert torch.allclose(got.up.abs(), m.up.abs() * root, rtol=1e-6)
    assert report.changes[0].action == "fold-alpha"


def test_fold_keeps_fp16_factors_in_fp16():
    m = lora(alpha=1.0)
    m = LoraModule("unet", m.path, alpha=1.0, down=m.down.half(), up=m.up.half())
    got = fold_scale(m)
    assert got.down.dtype == torch.float16 and got.up.dtype == torch.float16
    assert rel(got.delta(torch.float64), m.delta(torch.float64)) < 2e-3


def test_tucker_core_folded_into_down_exactly():
    r = 4
    m = LoraModule("unet", "down_blocks.0.resnets.0.conv1", alpha=3.0, down=rnd(r, 16, 1, 1),
                   mid=rnd(r, r, 3, 3), up=rnd(24, r, 1, 1))
    ref = torch.einsum("ijhw,oi,jc->ochw", m.mid.double(), m.up.double().flatten(1), m.down.double().flatten(1))
    ref = ref * 3.0 / r
    flat = fold_tucker(m)
    assert flat.mid is None and tuple(flat.down.shape) == (r, 16, 3, 3)
    assert rel(flat.delta(torch.float64), ref) < 1e-6
    out, report = convert(adapter(m), "diffusers")
    assert out.modules[m.key].mid is None and report.changes[0].action == "fold-tucker"
    kept, _ = convert(adapter(m), "kohya")
    assert kept.modules[m.key].mid is m.mid


def _lokr(path="down_blocks.0.attentions.0.proj_in") -> LokrModule:
    return LokrModule("unet", path, alpha=2.0, w1=rnd(4, 4), w2a=rnd(6, 2), w2b=rnd(2, 4))


def _loha(path="down_blocks.0.attentions.0.proj_out") -> LohaModule:
    return LohaModule("unet", path, alpha=3.0, w1a=rnd(24, 3), w1b=rnd(3, 16), w2a=rnd(24, 3), w2b=rnd(3, 16))


def test_lycoris_kinds_kept_for_kohya_refused_elsewhere_without_asking():
    mods = [_lokr(), _loha(), FullModule("unet", "conv_in", diff=rnd(8, 4, 3, 3))]
    out, report = convert(adapter(*mods), "kohya")
    assert [m.kind for m in out.modules.values()] == ["lokr", "loha", "full"] and report.exact
    with pytest.raises(LoraToolError, match=r"3 module\(s\) cannot be written as diffusers.*proj_in: a lokr module"
                                            r".*--rank N or --lossy"):
        convert(adapter(*mods), "diffusers")


@pytest.mark.parametrize("make", [_lokr, _loha, lambda: FullModule("unet", "x", diff=rnd(24, 16))])
def test_lossy_lowering_is_the_best_rank_k_and_reports_its_error(make):
    m = make()
    ref = m.delta(torch.float64).flatten(1)
    s = torch.linalg.svdvals(ref)
    out, report = convert(adapter(m), "diffusers", rank=3)
    got = out.modules[m.key]
    assert got.kind == "lora" and got.rank == 3
    eckart_young = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
    (change,) = report.changes
    assert change.action == "svd" and change.rel_error == pytest.approx(eckart_young, rel=1e-5, abs=1e-9)
    assert rel(got.delta(torch.float64).flatten(1), ref) == pytest.approx(change.rel_error, rel=1e-9)
    assert not report.exact and report.max_rel_error == change.rel_error


def test_default_rank_is_the_smallest_keeping_999_of_the_norm():
    m = FullModule("unet", "x", diff=rnd(40, 30) @ torch.diag(torch.logspace(0, -4, 30, dtype=torch.float32)))
    low, err = lower_to_lora(m)
    s = torch.linalg.svdvals(m.diff.double())
    kept = s.square().cumsum(0).sqrt() / s.square().sum().sqrt()
    want = int((kept < 0.999 * (1 - 1e-12)).sum()) + 1
    assert low.rank == want and low.alpha == float(want)
    assert err <= math.sqrt(1 - 0.999**2) + 1e-6
    assert lower_to_lora(m, cap=3)[0].rank == 3


def test_conv_lowering_keeps_kohya_conv_shapes():
    m = FullModule("unet", "down_blocks.0.resnets.0.conv1", diff=rnd(8, 6, 3, 3))
    low, err = lower_to_lora(m, rank=54)
    assert tuple(low.down.shape) == (8, 6, 3, 3) and tuple(low.up.shape) == (8, 8, 1, 1)  # rank capped at 8
    assert err < 1e-6


def test_lowering_is_asked_for_every_lycoris_module_even_for_kohya():
    out, report = convert(adapter(_lokr()), "kohya", lossy=True)
    assert next(iter(out.modules.values())).kind == "lora" and report.changes[0].action == "svd"


def test_dora_axes():
    out_axis = lora(dora=Dora(rnd(24, 1).abs(), "out"))
    in_axis = lora("up_blocks.1.attentions.0.proj_in", dora=Dora(rnd(1, 16).abs(), "in"))
    got, _ = convert(adapter(out_axis), "peft")
    assert got.modules[out_axis.key].dora.magnitude is out_axis.dora.magnitude
    with pytest.raises(LoraToolError, match="per input column.*cannot be turned"):
        convert(adapter(in_axis), "diffusers")
    with pytest.raises(LoraToolError, match="no place for a DoRA"):
        convert(adapter(out_axis), "diffusers-old")
    kept, _ = convert(adapter(out_axis, in_axis), "kohya")
    assert {m.dora.axis for m in kept.modules.values()} == {"in", "out"}


def test_strict_names_unknown_keys_and_drop_unknown_lists_them():
    a = adapter(lora(), NormModule("unet", "down_blocks.0.norm", w_norm=rnd(8)), unknown=["weird.key"])
    with pytest.raises(LoraToolError, match=r"2 module\(s\).*weird.key: no format recognises.*unet.down_blocks.0.norm"):
        convert(a, "diffusers")
    out, report = convert(a, "diffusers", drop_unknown=True)
    assert list(out.modules) == ["unet.down_blocks.0.attentions.0.proj_in"]
    assert [k for k, _ in report.dropped] == ["weird.key", "unet.down_blocks.0.norm"]
    assert report.counts() == {"rename": 1, "drop": 2} and not report.exact


def test_dtype_cast_applies_to_every_factor_and_magnitude():
    m = lora(dora=Dora(rnd(24, 1).abs(), "out"))
    out, _ = convert(adapter(m), "kohya", dtype=torch.bfloat16)
    got = out.modules[m.key]
    assert got.down.dtype == got.up.dtype == got.dora.magnitude.dtype == torch.bfloat16
    assert m.down.dtype == torch.float32  # the input adapter is untouched
