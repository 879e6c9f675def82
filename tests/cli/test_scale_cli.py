"""`loratool scale`: exact strength change, same format, optional LBW."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.core.modules import Adapter, LoraModule
from loratool.formats import read_adapter, write_adapter
from loratool.io.safetensors import SafetensorsFile

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
MID = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "unet.down_blocks.0.resnets.0.conv1"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
SHAPES = {Q: (320, 320), MID: (1280, 768), CONV: (320, 320, 3, 3), TE: (768, 768)}


def make_lora(path: Path, rank: int, alpha: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = Adapter(base_model="sd1")
    for key, shape in SHAPES.items():
        comp, p = key.split(".", 1)
        down = torch.randn(rank, *shape[1:], generator=g) * 0.1
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.1
        a.add(LoraModule(component=comp, path=p, alpha=alpha, down=down, up=up))
    write_adapter(a, path, "kohya")
    return read_adapter(path)


def test_scale_negative_and_same_layout(tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    a = make_lora(src, 4, 2.0, 1)
    out = tmp_path / "s.safetensors"
    res = CliRunner().invoke(cli, ["scale", str(src), "-0.5", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    s = read_adapter(out)
    for key in SHAPES:
        assert torch.allclose(s.modules[key].delta(torch.float64), -0.5 * a.modules[key].delta(torch.float64),
                              atol=1e-9)
    with SafetensorsFile(src) as f, SafetensorsFile(out) as g:
        assert set(f.keys()) == set(g.keys())  # same layout, alpha changed in place
    assert json.loads(res.output)["modules"] == len(SHAPES)


def test_scale_with_blocks(tmp_path: Path) -> None:
    src = tmp_path / "a.safetensors"
    a = make_lora(src, 4, 2.0, 1)
    out = tmp_path / "s.safetensors"
    res = CliRunner().invoke(cli, ["scale", str(src), "2", "--lbw", "OUTD", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    s = read_adapter(out)
    from loratool.arch import lbw_weights

    table = lbw_weights("sd1", "OUTD")
    from loratool.arch import load_arch

    arch = load_arch("sd1")
    for key in (TE, CONV, MID):
        w = 2 * table[arch.modules[key].block]
        assert torch.allclose(s.modules[key].delta(torch.float64), w * a.modules[key].delta(torch.float64), atol=1e-9)
