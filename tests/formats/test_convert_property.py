"""Property: random canonical adapters over random module subsets (SD1, SDXL and Flux, fused and split
Flux projections, LyCORIS kinds for kohya) go through ``ops.convert`` into every layout and back, chained
in a random order, with the same ΔW per layer part. (The codec-level round trip of SD1/SDXL modules is
tests/formats/test_codecs_property.py; this one adds the conversion decisions: fuse/split, alpha
folding, rsLoRA, Tucker, LyCORIS kept for kohya.) One fixed chain also runs through the CLI."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool.arch import load_arch
from loratool.core.modules import Adapter, LokrModule, LoraModule
from loratool.formats import decode, encode
from loratool.formats.diffusers import encode_peft
from loratool.linalg import product_sq_norm
from loratool.linalg.structured import structured_factors
from loratool.ops.convert import convert

FORMATS = {"sd1": ["kohya", "diffusers", "peft"], "sdxl": ["kohya", "diffusers", "peft"],
           "flux": ["kohya", "diffusers", "peft", "aitoolkit", "bfl"]}
ALPHAS = [None, 1.0, 2.0, 8.0, 0.5]


@st.composite
def adapters(draw):
    base = draw(st.sampled_from(["sd1", "sdxl", "flux"]))
    table = load_arch(base)
    keys = sorted(k for k, s in table.modules.items() if s.component in ("unet", "transformer", "text_encoder"))
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=6, unique=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    a = Adapter(base_model=base, source_format="test")
    owners = {p: k for k, s in table.modules.items() for p, _ in s.parts}
    for key in chosen:
        if key in owners and owners[key] in a.modules or any(owners.get(k) == key for k in a.modules):
            continue  # a part and its fused module together is not one adapter
        spec = table.modules[key]
        comp, _, path = key.partition(".")
        shape = tuple(spec.shape)
        r = draw(st.integers(1, 3))
        alpha = draw(st.sampled_from(ALPHAS))
        down = torch.randn(r, *shape[1:], generator=g) if len(shape) == 4 else torch.randn(r, shape[1], generator=g)
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.1
        rslora = draw(st.booleans()) and alpha is not None
        if base != "flux" and len(shape) == 2 and shape[0] % 4 == 0 and draw(st.booleans()):
            a.add(LokrModule(comp, path, alpha=alpha, w1=torch.randn(4, 2, generator=g),
                             w2a=torch.randn(shape[0] // 4, r, generator=g),
                             w2b=torch.randn(r, shape[1] // 2, generator=g)) if shape[1] % 2 == 0 else
                  LoraModule(comp, path, alpha=alpha, down=down, up=up, rslora=rslora))
        else:
            a.add(LoraModule(comp, path, alpha=alpha, down=down, up=up, rslora=rslora))
    chain = draw(st.lists(st.sampled_from(FORMATS[base]), min_size=1, max_size=4))
    return a, chain


def _parts(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact factors of ΔW per layer part (fused modules cut into their row ranges)."""
    table = load_arch(adapter.base_model)
    out = {}
    for key, m in adapter.modules.items():
        up, down = structured_factors(m)
        spec = table.modules.get(key)
        if spec is not None and spec.parts:
            for part, (r0, r1) in spec.parts:
                out[part] = (up[r0:r1], down)
        else:
            out[key] = (up, down)
    return out


def _same(a: Adapter, b: Adapter, tol: float) -> None:
    pa, pb = _parts(a), _parts(b)
    assert set(pa) <= set(pb)  # every trained part comes back ...
    for key in set(pb) - set(pa):  # ... and a part a fused layout had to add is exactly zero
        assert product_sq_norm(*pb[key]) == 0.0, key
    for key, (up, down) in pa.items():
        total = product_sq_norm(up, down)
        u2, d2 = pb[key]
        diff = product_sq_norm(torch.cat([up, -u2], 1), torch.cat([down, d2], 0))
        assert math.sqrt(max(diff, 0.0) / total) < tol, key


def _through(adapter: Adapter, fmt: str) -> Adapter:
    converted, report = convert(adapter, fmt, lossy=False)
    assert not report.lossy and not report.dropped
    if fmt == "peft":
        out = Adapter(base_model=adapter.base_model, source_format="peft")
        for comp, (tensors, config) in encode_peft(converted).items():
            for m in decode(tensors, None, config, component=comp).modules.values():
                out.add(m)
        return out
    tensors, meta = encode(converted, fmt)
    return decode(tensors, meta)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters())
def test_any_chain_of_layouts_keeps_delta(case):
    adapter, chain = case
    if any(m.kind != "lora" for m in adapter.modules.values()):
        chain = ["kohya"] * len(chain)  # LyCORIS kinds: kohya holds them; the others refuse (tested apart)
    if any(m.component != "transformer" for m in adapter.modules.values()):
        chain = [f for f in chain if f != "bfl"] or ["kohya"]  # BFL holds the Flux transformer only
    current = adapter
    for fmt in chain:
        current = _through(current, fmt)
        assert current.base_model == adapter.base_model, fmt  # the family survives every layout
    _same(adapter, current, 1e-5)


def test_flux_chain_through_the_cli(tmp_path):
    from click.testing import CliRunner

    from loratool.cli.main import cli
    from loratool.formats import read_adapter, write_adapter

    g = torch.Generator().manual_seed(3)
    a = Adapter(base_model="flux", source_format="test")
    for path, out, inp, alpha in (("transformer_blocks.0.attn.to_qkv", 9216, 3072, 8.0),
                                  ("single_transformer_blocks.1.to_qkv_mlp", 21504, 3072, 4.0),
                                  ("single_transformer_blocks.1.proj_out", 3072, 15360, None)):
        a.add(LoraModule("transformer", path, alpha=alpha, down=torch.randn(4, inp, generator=g),
                         up=torch.randn(out, 4, generator=g) * 0.1))
    src = tmp_path / "0.safetensors"
    write_adapter(a, src, "kohya")
    previous = src
    for i, fmt in enumerate(["diffusers", "aitoolkit", "bfl", "webui", "peft", "diffusers"], 1):
        out = tmp_path / (f"{i}" if fmt == "peft" else f"{i}.safetensors")
        result = CliRunner().invoke(cli, ["convert", str(previous), "--to", fmt, "-o", str(out)])
        assert result.exit_code == 0, (fmt, result.output)
        previous = out
    final = read_adapter(previous)
    final.base_model = "flux"
    _same(a, final, 1e-5)


def test_flux_clip_only_adapter_stays_flux_through_kohya_then_aitoolkit():
    """The example hypothesis found (about one run in seven before the property was seeded): a Flux adapter
    that only touches CLIP-L came back from kohya as sd1 (its flux1 metadata was not read), and the aitoolkit
    layout then refused it."""
    g = torch.Generator().manual_seed(1)
    a = Adapter(base_model="flux", source_format="test")
    a.add(LoraModule("text_encoder", "text_model.encoder.layers.3.mlp.fc1", alpha=2.0,
                     down=torch.randn(2, 768, generator=g), up=torch.randn(3072, 2, generator=g) * 0.1))
    current = a
    for fmt in ("kohya", "aitoolkit", "peft", "diffusers"):
        current = _through(current, fmt)
        assert current.base_model == "flux", fmt
    _same(a, current, 1e-5)
