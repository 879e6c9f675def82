"""Random canonical adapters for the codec tests (seeded, small); imported by test_codecs*.py."""

from __future__ import annotations

import torch

from loratool.core.modules import Adapter, Dora, LoraModule


def rand(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def lora(g: torch.Generator, key: str, shape: tuple[int, ...], r: int, *, alpha: float | None = None,
         dtype: torch.dtype = torch.float32, tucker: bool = False, rslora: bool = False,
         dora: str | None = None, bias: bool = False) -> LoraModule:
    """A LoRA over a weight of ``shape``: linear (2-D), conv 1x1 or kxk (4-D), optional Tucker core."""
    comp, _, path = key.partition(".")
    out, inp = shape[0], shape[1]
    if len(shape) == 2:
        down, up, mid = rand(g, r, inp, dtype=dtype), rand(g, out, r, dtype=dtype), None
    elif tucker:
        down, up = rand(g, r, inp, 1, 1, dtype=dtype), rand(g, out, r, 1, 1, dtype=dtype)
        mid = rand(g, r, r, *shape[2:], dtype=dtype)
    else:
        down, up, mid = rand(g, r, inp, *shape[2:], dtype=dtype), rand(g, out, r, 1, 1, dtype=dtype), None
    m = LoraModule(comp, path, alpha=alpha, down=down, up=up, mid=mid, rslora=rslora)
    if dora == "out":
        m.dora = Dora(rand(g, out, *([1] * (len(shape) - 1)), dtype=dtype).abs(), "out")
    elif dora == "in":
        m.dora = Dora(rand(g, 1, inp, *([1] * (len(shape) - 2)), dtype=dtype).abs(), "in")
    if bias:
        m.bias = rand(g, out, dtype=dtype)
    return m


def adapter_of(modules, base: str = "unknown", metadata: dict[str, str] | None = None) -> Adapter:
    a = Adapter(base_model=base, metadata=dict(metadata or {}))
    for m in modules:
        a.add(m)
    return a


def assert_same_delta(a: Adapter, b: Adapter, *, exact: bool, rtol: float = 1e-12) -> None:
    """Same module keys, same kinds and the same ΔW (float64); bit-equal when ``exact``."""
    assert set(a.modules) == set(b.modules)
    for key, m in a.modules.items():
        n = b.modules[key]
        assert m.kind == n.kind, key
        da, db = m.delta(torch.float64), n.delta(torch.float64)
        if exact:
            assert torch.equal(da, db), key
        else:
            assert float((da - db).abs().max()) <= rtol * float(da.abs().max()), key
        assert (m.dora is None) == (n.dora is None), key
        if m.dora is not None:
            assert m.dora.axis == n.dora.axis and torch.equal(m.dora.magnitude, n.dora.magnitude), key
        assert (m.bias is None) == (n.bias is None), key


def assert_same_factors(a: Adapter, b: Adapter) -> None:
    """Bit-identical factors, same dtype, and the same scale (to the last bit)."""
    for key, m in a.modules.items():
        n = b.modules[key]
        for x, y in zip(m.tensors(), n.tensors(), strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), key
        assert m.scale == n.scale or abs(m.scale - n.scale) <= 1e-15 * abs(m.scale), key
