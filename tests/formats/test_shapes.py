"""The header-only decode (formats.shapes) says what the full reader says: for every layout on every family,
LyCORIS kinds, Tucker and 1x1 convs, peft configs, rsLoRA, real files. Compared through the inspect report,
which reads every property a module has (kind, shapes, rank, alpha, scale, parameters, conv, bias), and the
module keys. What the header cannot tell is left to the full reader (None), never guessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_roundtrip_matrix import CASES, _adapter

from loratool.core.modules import Adapter, FullModule, LohaModule, LokrModule, LoraModule, NormModule
from loratool.formats import read_adapter, read_shapes, write_adapter
from loratool.formats.shapes import read_summary
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors
from loratool.ops.convert import convert
from loratool.ops.inspect import build_report, read_facts


def _same_report(path: Path) -> dict:
    shapes = read_shapes(path)
    assert shapes is not None, path
    full = read_adapter(path)
    facts = read_facts(path, check_hash=False, validated=True)
    got, want = build_report(shapes, facts), build_report(full, facts)
    assert got == want
    assert list(shapes.modules) == list(full.modules)
    for key, m in full.modules.items():
        assert shapes.modules[key].weight_shape == m.weight_shape, key
    return got


@pytest.mark.parametrize("fam_name,layout", CASES)
def test_every_layout_on_every_family(tmp_path, fam_name, layout):
    source = _adapter(fam_name, layout)
    if layout == "peft":
        comp = next(iter(source.modules.values())).component
        source.modules = {k: m for k, m in source.modules.items() if m.component == comp}
    converted, _ = convert(source, layout)
    out = tmp_path / ("a" if layout == "peft" else "a.safetensors")
    write_adapter(converted, out, layout)
    _same_report(out)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_lycoris_kinds_tucker_and_1x1_convs(tmp_path):
    g = _g()
    a = Adapter(base_model="sd1")
    conv = ("unet", "down_blocks.0.resnets.0.conv1")  # 320x320x3x3
    a.add(LoraModule(*conv, alpha=2.0, down=torch.randn(4, 320, 1, 1, generator=g),
                     mid=torch.randn(4, 4, 3, 3, generator=g), up=torch.randn(320, 4, 1, 1, generator=g)))
    a.add(LoraModule("unet", "down_blocks.0.attentions.0.proj_in", alpha=4.0,  # a 1x1 conv in SD1
                     down=torch.randn(4, 320, 1, 1, generator=g), up=torch.randn(320, 4, 1, 1, generator=g)))
    a.add(LohaModule("unet", "down_blocks.0.resnets.1.conv2", alpha=2.0, w1a=torch.randn(320, 2, generator=g),
                     w1b=torch.randn(2, 320 * 9, generator=g), w2a=torch.randn(320, 2, generator=g),
                     w2b=torch.randn(2, 320 * 9, generator=g), shape=(320, 320, 3, 3)))
    a.add(LokrModule("unet", "down_blocks.1.resnets.0.conv1", alpha=4.0, w1=torch.randn(8, 4, generator=g),
                     w2a=torch.randn(80, 4, generator=g), w2b=torch.randn(4, 80 * 9, generator=g),
                     shape=(640, 320, 3, 3)))
    a.add(LokrModule("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", w1=torch.randn(8, 8,
                     generator=g), w2=torch.randn(160, 160, generator=g)))
    a.add(FullModule("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj",
                     diff=torch.randn(768, 768, generator=g), bias=torch.randn(768, generator=g)))
    a.add(NormModule("text_encoder", "text_model.encoder.layers.0.layer_norm1", w_norm=torch.randn(768, generator=g),
                     bias=torch.randn(768, generator=g)))
    out = tmp_path / "lycoris.safetensors"
    write_adapter(a, out, "kohya")
    rep = _same_report(out)
    assert rep["kinds"] == ["full", "loha", "lokr", "lora", "norm"] and rep["conv_modules"] == 4


def test_peft_config_patterns_and_rslora(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    g = _g(1)
    q, k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in"
    tensors = {f"base_model.model.{q}.lora_A.weight": torch.randn(4, 320, generator=g),
               f"base_model.model.{q}.lora_B.weight": torch.randn(320, 4, generator=g),
               f"base_model.model.{k}.lora_A.weight": torch.randn(8, 1280, generator=g),
               f"base_model.model.{k}.lora_B.weight": torch.randn(1280, 8, generator=g)}
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"proj_in": 8},
         "alpha_pattern": {"proj_in": 3}}))
    rep = _same_report(folder)
    assert rep["scales"] == [1.0606601717798212, 4]


def test_the_bundled_and_real_files(real_dir, repo_root):
    files = sorted((real_dir / "adapters").glob("*.safetensors")) + [
        repo_root / "fixtures" / "example_sd15_kohya.safetensors", real_dir / "bad" / "empty_valid.safetensors",
        real_dir / "bad" / "sd15_malformed_hand_converted.safetensors"]
    decoded = [f for f in files if read_shapes(f) is not None]
    for f in decoded:
        _same_report(f)
    # only the layout whose keys carry no module names needs its tensors
    assert [f.name for f in files if f not in decoded] == ["sd15_cloneofsimo_safeloras.safetensors"]


def test_what_the_header_cannot_tell_is_left_to_the_reader(tmp_path, real_dir):
    g = _g(2)
    dora = Adapter(base_model="sd1")
    from loratool.core.modules import Dora

    dora.add(LoraModule("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", alpha=1.0,
                        down=torch.randn(2, 1280, generator=g), up=torch.randn(1280, 2, generator=g),
                        dora=Dora(torch.rand(1280, 1, generator=g), "out")))
    write_adapter(dora, tmp_path / "dora.safetensors", "kohya")
    assert read_shapes(tmp_path / "dora.safetensors") is None
    assert read_shapes(real_dir / "bad" / "sd15_diffusers_pickle.bin") is None
    embedding = Adapter(base_model="sd1", embeddings={"<cat>": torch.randn(2, 768, generator=g)})
    write_adapter(embedding, tmp_path / "ti.safetensors", "textual-inversion")
    assert read_shapes(tmp_path / "ti.safetensors") is None
    # read_summary falls back to the full reader for them
    assert read_summary(tmp_path / "dora.safetensors").modules  # a canonical Adapter with its tensors
    lone = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(2, 1280, generator=g)}
    write_safetensors(tmp_path / "lone.safetensors", lone)
    assert read_shapes(tmp_path / "lone.safetensors") is None  # no kind: the reader says why


def test_alpha_scalars_of_every_float_width(tmp_path):
    key = "lora_unet_mid_block_attentions_0_proj_in"
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        g = _g(3)
        tensors = {f"{key}.lora_down.weight": torch.randn(2, 1280, generator=g),
                   f"{key}.lora_up.weight": torch.randn(1280, 2, generator=g),
                   f"{key}.alpha": torch.tensor(1.5, dtype=dtype)}
        path = tmp_path / f"{dtype}.safetensors"
        write_safetensors(path, tensors)
        assert read_shapes(path).modules[f"unet.{'mid_block.attentions.0.proj_in'}"].alpha == 1.5
        with SafetensorsFile(path) as f:
            assert f.info(f"{key}.alpha").shape == ()
