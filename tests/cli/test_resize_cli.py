"""``loratool resize`` through click's CliRunner on a kohya file built here."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.core.modules import Adapter, LoraModule
from loratool.formats import read_adapter
from loratool.formats.write import write_adapter

PATHS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"]


def make_lora(tmp_path):
    gen = torch.Generator().manual_seed(0)
    a = Adapter(base_model="sd1")
    for p in PATHS:
        a.add(LoraModule(component="unet", path=p, alpha=8.0, down=torch.randn(16, 320, generator=gen).half(),
                         up=torch.randn(320, 16, generator=gen).half()))
    a.add(LoraModule(component="unet", path="down_blocks.0.resnets.0.conv1", alpha=4.0,
                     down=torch.randn(8, 320, 3, 3, generator=gen).half(),
                     up=torch.randn(320, 8, 1, 1, generator=gen).half()))
    path = tmp_path / "in.safetensors"
    write_adapter(a, path, "kohya")
    return path, a


def test_resize_keeps_scale_and_reports(tmp_path):
    src, original = make_lora(tmp_path)
    out = tmp_path / "out.safetensors"
    res = CliRunner().invoke(cli, ["resize", str(src), "-r", "4", "--conv-rank", "2", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["summary"]["modules"] == 3 and data["summary"]["dense"] == []
    got = read_adapter(out)
    for key, old in original.modules.items():
        new = got.modules[key]
        assert new.rank == (2 if "resnets" in key else 4)
        assert new.scale == old.scale
        d_old = old.delta(torch.float64).reshape(old.weight_shape[0], -1)
        s = torch.linalg.svdvals(d_old)
        err = float((new.delta(torch.float64).reshape(d_old.shape) - d_old).norm())
        assert err <= float(s[new.rank:].square().sum().sqrt()) * 1.001 + 1e-3
    again = tmp_path / "again.safetensors"
    CliRunner().invoke(cli, ["resize", str(src), "-r", "4", "--conv-rank", "2", "-o", str(again), "-q"])
    assert again.read_bytes() == out.read_bytes()


def test_resize_dynamic_and_errors(tmp_path):
    src, _ = make_lora(tmp_path)
    out = tmp_path / "dyn.safetensors"
    res = CliRunner().invoke(cli, ["resize", str(src), "-r", "16", "--rank-mode", "fro:0.5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    ranks = {m.rank for m in read_adapter(out).modules.values()}
    assert max(ranks) < 16
    res = CliRunner().invoke(cli, ["resize", str(src), "-r", "4", "-o", str(out)])
    assert res.exit_code == 1 and "loratool: error:" in res.output
