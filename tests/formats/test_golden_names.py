"""Golden names: real files' key/shape tables come back key for key, shape for shape, through convert.

For the real SD1.5 and SDXL kohya tables, the diffusers adapter over the same modules converts to
exactly those keys and shapes (kohya → diffusers → kohya); likewise the Flux kohya, diffusers and
BFL-named ("ai-toolkit" in InvokeAI's tests) tables through the other layouts. Values are zeros or
small randoms in the table's dtype; no file is written (``encode`` gives the tensors).
"""

from __future__ import annotations

import json

import pytest
import torch

from loratool.formats import encode
from loratool.formats.read import read_raw
from loratool.formats.source import RawSource
from loratool.ops.convert import convert

pytestmark = pytest.mark.real

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, None: torch.float16}


def _table(real_dir, name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    raw = json.loads((real_dir / "keyshapes" / name).read_text())
    return {k: (tuple(v["shape"]), DTYPES[v.get("dtype")]) for k, v in raw.items()}


def _tensors(table, random: bool) -> dict[str, torch.Tensor]:
    """Zeros, or distinct non-zero values per key (a ramp with a per-key offset: cheap, never
    block-diagonal, no two downs equal) in the table's dtype."""
    out = {}
    for key, (shape, dtype) in table.items():
        if key.endswith(".alpha"):
            out[key] = torch.tensor(8.0, dtype=dtype)
        elif random:
            n = 1
            for d in shape:
                n *= d
            offset = (sum(map(ord, key)) % 97 + 1) * 1e-3
            out[key] = (torch.linspace(-0.01, 0.01, n) + offset).reshape(shape).to(dtype)
        else:
            out[key] = torch.zeros(shape, dtype=dtype)
    return out


def _read(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    loaders = {k: (lambda t=t: t) for k, t in tensors.items()}
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    adapter = read_raw(RawSource("<memory>", loaders, shapes, dict(metadata or {})))
    assert not adapter.unknown, adapter.unknown[:3]
    return adapter


def _through(tensors, metadata, fmt: str):
    adapter = _read(tensors, metadata)
    converted, report = convert(adapter, fmt)
    assert not report.lossy and not report.dropped
    return encode(converted, fmt)


def _shapes(tensors) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in tensors.items()}


@pytest.mark.parametrize("name,prefixes", [
    ("sd15_kohya_lora_r128.json", ("unet.", "text_encoder.")),
    ("sdxl_kohya_lora_r32.json", ("unet.", "text_encoder.", "text_encoder_2.")),
])
def test_sd_kohya_tables_round_trip_through_diffusers(real_dir, name, prefixes):
    table = _table(real_dir, name)
    diffusers, meta = _through(_tensors(table, random=False), {}, "diffusers")
    assert all(k.startswith(prefixes) and ".lora_" in k for k in diffusers)
    assert all(".text_model." in k for k in diffusers if k.startswith("text_encoder"))
    kohya, _ = _through(diffusers, meta, "kohya")
    assert _shapes(kohya) == {k: s for k, (s, _) in table.items()}
    assert {k: t.dtype for k, t in kohya.items() if not k.endswith(".alpha")} == \
        {k: d for k, (_, d) in table.items() if not k.endswith(".alpha")}


def test_sdxl_unet_keys_use_sai_block_names(real_dir):
    table = _table(real_dir, "sdxl_kohya_lora_r32.json")
    kohya, _ = _through(_tensors(table, random=False), {}, "kohya")
    unet = [k for k in kohya if k.startswith("lora_unet_")]
    assert unet and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                      "lora_unet_output_blocks_")) for k in unet)


def test_flux_kohya_table_round_trips_through_split_layouts(real_dir):
    table = _table(real_dir, "flux_kohya_lora_r16.json")
    expected = {k: s for k, (s, _) in table.items()}
    for fmt in ("diffusers", "aitoolkit"):
        split, meta = _through(_tensors(table, random=True), {}, fmt)
        assert not any(".to_qkv" in k or "linear1" in k for k in split)
        assert any(k.endswith("attn.to_k.lora_A.weight") for k in split)
        kohya, _ = _through(split, meta, "kohya")
        # ai-toolkit has no alpha: the scale is folded into the factors, so no .alpha comes back
        want = {k: s for k, s in expected.items() if fmt != "aitoolkit" or not k.endswith(".alpha")}
        assert _shapes(kohya) == want


def test_flux_diffusers_table_round_trips_through_kohya(real_dir):
    table = _table(real_dir, "flux_diffusers_lora_r32.json")
    kohya, meta = _through(_tensors(table, random=True), {}, "kohya")
    assert all(k.startswith("lora_unet_") for k in kohya)
    back, _ = _through(kohya, meta, "diffusers")
    assert _shapes(back) == {k: s for k, (s, _) in table.items()}


def test_flux_bfl_named_table_round_trips_through_kohya(real_dir):
    table = _table(real_dir, "flux_aitoolkit_lora_r16.json")
    kohya, meta = _through(_tensors(table, random=True), {}, "kohya")
    back, _ = _through(kohya, meta, "bfl")
    assert _shapes(back) == {k: s for k, (s, _) in table.items()}
