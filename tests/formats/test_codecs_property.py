"""Property: random canonical adapters over random module subsets of the SD1.x and SDXL tables go through
every layout and come back with the same modules, bit-identical factors and the same scale (so the
same ΔW = scale · up · down)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codecs_helpers import adapter_of, lora

from loratool.arch import load_arch
from loratool.formats import decode, encode
from loratool.formats.diffusers import encode_peft

ALPHAS = [None, 1.0, 2.0, 4.0, 0.5, 3.0, 16.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def adapters(draw):
    base = draw(st.sampled_from(["sd1", "sdxl"]))
    table = load_arch(base)
    keys = sorted(k for k, s in table.modules.items() if not s.is_fused)
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=10, unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from(DTYPES))
    rslora = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    mods = []
    for key in chosen:
        shape = tuple(table.modules[key].shape)
        alpha = draw(st.sampled_from(ALPHAS))
        dora = draw(st.sampled_from([None, "out"]))
        mods.append(lora(g, key, shape, draw(st.integers(1, 3)), alpha=alpha, dtype=dtype, dora=dora,
                         rslora=rslora and alpha is not None))
    return adapter_of(mods, base)


def _peft_roundtrip(a):
    out = adapter_of([])
    for comp, (tensors, config) in encode_peft(a).items():
        for m in decode(tensors, None, config, component=comp).modules.values():
            out.add(m)
    return out


def _check(a, b):
    assert set(b.modules) == set(a.modules)
    for key, m in a.modules.items():
        n = b.modules[key]
        assert n.down.dtype == m.down.dtype and torch.equal(n.down, m.down), key
        assert torch.equal(n.up, m.up), key
        assert math.isclose(n.scale, m.scale, rel_tol=1e-12), key
        if m.dora is not None:
            assert n.dora.axis == "out" and torch.equal(n.dora.magnitude, m.dora.magnitude), key


@settings(max_examples=30, deadline=None)
@given(adapters())
def test_every_layout_roundtrips(a):
    for fmt in ("kohya", "diffusers"):
        tensors, meta = encode(a, fmt)
        _check(a, decode(tensors, meta))
    _check(a, _peft_roundtrip(a))


@st.composite
def flux_adapters(draw, fused: bool):
    """Flux modules at kohya/BFL granularity (fused q/k/v) or diffusers granularity (split)."""
    table = load_arch("flux")
    keys = sorted(s.key for s in table.targets("all", fused=fused, components=("transformer",)))
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=6, unique=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    mods = [lora(g, key, tuple(table.modules[key].shape), draw(st.integers(1, 2)),
                 alpha=draw(st.sampled_from(ALPHAS)), dtype=dtype) for key in chosen]
    return adapter_of(mods, "flux")


def _check_folded(a, b):
    """Layouts without alpha: exactly the factors fold_scale gives (the originals when the scale is 1)."""
    from loratool.formats import fold_scale

    assert set(b.modules) == set(a.modules)
    for key, m in a.modules.items():
        n, f = b.modules[key], fold_scale(m)
        assert n.alpha is None and torch.equal(n.down, f.down) and torch.equal(n.up, f.up), key
        if m.scale == 1.0:
            assert torch.equal(n.down, m.down) and torch.equal(n.up, m.up), key


@settings(max_examples=15, deadline=None)
@given(flux_adapters(fused=True))
def test_flux_fused_layouts_roundtrip(a):
    _check(a, decode(*encode(a, "kohya")))
    _check_folded(a, decode(*encode(a, "bfl")))


@settings(max_examples=15, deadline=None)
@given(flux_adapters(fused=False))
def test_flux_split_layouts_roundtrip(a):
    _check(a, decode(*encode(a, "diffusers")))
    _check_folded(a, decode(*encode(a, "aitoolkit")))
