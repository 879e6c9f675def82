"""Layouts without module names in their keys: cloneofsimo safeloras and legacy .pt, textual inversion."""

from __future__ import annotations

import json

import torch

from loratool.formats import read_adapter
from loratool.formats.special import _te_order, _unet_order
from loratool.io.writer import write_safetensors


def _factors(order, r=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)) for _, (out, inp) in order]


def test_cloneofsimo_order_names_every_index(tmp_path):
    order = _unet_order(["CrossAttention", "Attention", "GEGLU"])
    assert len(order) == 144 and order[4][0].endswith("ff.net.0.proj") and order[-1][0].startswith("mid_block.")
    te = _te_order(["CLIPAttention"])
    tensors = {}
    for i, (up, down) in enumerate(_factors(order)):
        tensors[f"unet:{i}:up"], tensors[f"unet:{i}:down"] = up, down
    for i, (up, down) in enumerate(_factors(te, seed=1)):
        tensors[f"text_encoder:{i}:up"], tensors[f"text_encoder:{i}:down"] = up, down
    tensors["<tok>"] = torch.ones(768)
    meta = {"unet": json.dumps(["CrossAttention", "Attention", "GEGLU"]), "text_encoder": '["CLIPAttention"]',
            "<tok>": "<embed>"}
    a = read_adapter(write_safetensors(tmp_path / "c.safetensors", tensors, meta))
    assert (a.source_format, a.base_model, len(a.modules), a.unknown) == ("cloneofsimo", "sd1", 192, [])
    assert torch.equal(a.modules["unet." + order[7][0]].up, tensors["unet:7:up"])
    assert a.modules["text_encoder.text_model.encoder.layers.0.self_attn.k_proj"].up is not None
    assert a.embeddings["<tok>"].shape == (1, 768)


def test_cloneofsimo_without_geglu_in_metadata_shifts_the_order(tmp_path):
    order = _unet_order(["CrossAttention", "Attention"])
    assert len(order) == 128
    tensors = {}
    for i, (up, down) in enumerate(_factors(order)):
        tensors[f"unet:{i}:up"], tensors[f"unet:{i}:down"] = up, down
    a = read_adapter(write_safetensors(tmp_path / "c.safetensors", tensors, {"unet": '["CrossAttention"]'}))
    assert len(a.modules) == 128 and not a.unknown


def test_cloneofsimo_shape_that_does_not_fit_is_unknown_with_reason(tmp_path):
    tensors = {"unet:0:up": torch.zeros(99, 1), "unet:0:down": torch.zeros(1, 320)}
    a = read_adapter(write_safetensors(tmp_path / "c.safetensors", tensors))
    assert not a.modules and sorted(a.unknown) == sorted(tensors)
    assert "does not fit" in a.unknown_reasons["unet:0:up"]


def test_legacy_pt_list(tmp_path):
    order = _unet_order(["GEGLU"])
    flat = [t for pair in _factors(order) for t in pair]
    torch.save(flat, tmp_path / "lora.pt")
    a = read_adapter(tmp_path / "lora.pt")
    assert (a.source_format, a.base_model, len(a.modules)) == ("cloneofsimo", "sd1", 144)
    assert torch.equal(a.modules["unet." + order[3][0]].down, flat[7])


def test_textual_inversion_layouts(tmp_path):
    a = read_adapter(write_safetensors(tmp_path / "mytoken.safetensors", {"emb_params": torch.ones(2, 768)}))
    assert (a.source_format, a.base_model, list(a.embeddings)) == ("textual-inversion", "sd1", ["mytoken"])
    b = read_adapter(write_safetensors(tmp_path / "x.safetensors",
                                       {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}))
    assert (b.base_model, sorted(b.embeddings)) == ("sdxl", ["clip_g", "clip_l"])
    torch.save({"string_to_param": {"*": torch.ones(3, 1024)}, "name": "tok"}, tmp_path / "tok.pt")
    c = read_adapter(tmp_path / "tok.pt")
    assert (c.source_format, c.base_model, c.embeddings["tok"].shape) == ("textual-inversion", "sd2", (3, 1024))
