"""scale(): ΔW' = w·ΔW for every module kind, alpha changed where it is stored."""

from __future__ import annotations

import pytest
import torch

from loratool.core.modules import (
    Adapter,
    Dora,
    FullModule,
    LohaModule,
    LokrModule,
    LoraModule,
    NormModule,
)
from loratool.errors import LoraToolError
from loratool.ops.scale import scale, scale_module


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _modules() -> list:
    g = _g(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [
        LoraModule(component="unet", path="a", alpha=4.0, down=r(8, 12), up=r(10, 8)),
        LoraModule(component="unet", path="b", alpha=None, down=r(3, 12).half(), up=r(10, 3).half()),
        LoraModule(component="unet", path="c", alpha=2.0, down=r(2, 4, 1, 1), mid=r(2, 2, 3, 3),
                   up=r(6, 2, 1, 1), rslora=True),
        LohaModule(component="unet", path="d", alpha=1.0, w1a=r(10, 2), w1b=r(2, 12), w2a=r(10, 2), w2b=r(2, 12)),
        LokrModule(component="unet", path="e", alpha=3.0, w1=r(2, 3), w2a=r(5, 2), w2b=r(2, 4)),
        LokrModule(component="unet", path="f", alpha=3.0, w1=r(2, 3), w2=r(5, 4)),
        FullModule(component="unet", path="g", diff=r(6, 5), bias=r(6)),
        NormModule(component="unet", path="h", w_norm=r(7), bias=r(7)),
    ]


@pytest.mark.parametrize("w", [0.5, -0.7, 2.0, 0.0])
def test_every_kind_scales_exactly(w: float) -> None:
    for m in _modules():
        s = scale_module(m, w)
        want = w * m.delta(torch.float64)
        tol = 2e-3 if m.tensors()[0].dtype == torch.float16 else 1e-6
        assert torch.allclose(s.delta(torch.float64), want, atol=tol * float(want.abs().max() + 1)), m.key
        if m.bias is not None:
            assert torch.allclose(s.bias.double(), w * m.bias.double(), atol=1e-6)
        assert all(t.dtype == u.dtype for t, u in zip(s.tensors(), m.tensors(), strict=True))


def test_alpha_is_scaled_where_stored() -> None:
    a, b, *_ = _modules()
    s = scale_module(a, -0.5)
    assert s.alpha == 2.0 and torch.equal(s.down, a.down) and torch.equal(s.up, -a.up)
    t = scale_module(b, 0.5)  # no alpha: one factor carries the scale
    assert t.alpha is None and torch.equal(t.down, b.down)
    f = scale_module(_modules()[5], 0.5)  # LoKr with both sides whole ignores alpha
    assert f.alpha == 3.0


def test_scale_adapter_keeps_everything_else() -> None:
    a = Adapter(base_model="sd1", source_format="kohya", metadata={"ss_network_dim": "8"})
    for m in _modules():
        a.add(m)
    out, weights = scale(a, 0.25)
    assert set(weights.values()) == {0.25}
    assert out.source_format == "kohya" and out.metadata == a.metadata and out.base_model == "sd1"
    assert list(out.modules) == list(a.modules)
    assert a.modules["unet.a"].alpha == 4.0  # input untouched


def test_refuses_dora_and_nonfinite() -> None:
    m = _modules()[0]
    m.dora = Dora(magnitude=torch.ones(10, 1), axis="out")
    with pytest.raises(LoraToolError, match="DoRA"):
        scale_module(m, 0.5)
    a = Adapter()
    with pytest.raises(LoraToolError, match="finite"):
        scale(a, float("nan"))


def test_a_factor_scaled_out_of_its_dtype_range_is_refused_naming_the_module():
    bare = LoraModule(component="unet", path="b", alpha=None, down=torch.ones(2, 4).half(), up=torch.ones(3, 2).half())
    with pytest.raises(LoraToolError, match=r"unet\.b: scaling by 100000 leaves torch.float16 values"):
        scale(Adapter(modules={bare.key: bare}), 1e5)


def test_factors_passed_through_are_the_input_tensors():
    m = _modules()[0]  # alpha stored: scaling changes alpha only
    out, _ = scale(Adapter(modules={m.key: m}), 0.5)
    assert out.modules[m.key].up is m.up and out.modules[m.key].down is m.down
