"""Operations keep their input's layout unless --to says otherwise (issue 13: scale, resize and mix on a
diffusers or peft input wrote kohya). One rule, ``formats.output_layout``, through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.core.modules import Adapter, LoraModule
from loratool.formats import output_layout, read_adapter, write_adapter

U = "down_blocks.0.attentions.0.transformer_blocks.0"
UNET = {f"unet.{U}.attn1.to_q": (320, 320), f"unet.{U}.attn2.to_k": (320, 768)}
TEXT = {"text_encoder.text_model.encoder.layers.0.self_attn.v_proj": (768, 768)}
LAYOUTS = ["diffusers", "peft", "diffusers-old", "diffusers-attnproc", "kohya", "lycoris", "ldm"]


def _input(tmp_path: Path, layout: str, seed: int = 0) -> Path:
    """An SD1 LoRA written in ``layout`` (the UNet only where the layout holds nothing else)."""
    g = torch.Generator().manual_seed(seed)
    a = Adapter(base_model="sd1")
    modules = UNET if layout in ("lycoris", "ldm") else {**UNET, **TEXT}
    for key, (out, inp) in modules.items():
        comp, _, p = key.partition(".")
        a.add(LoraModule(comp, p, alpha=2.0, down=torch.randn(4, inp, generator=g) * 0.1,
                         up=torch.randn(out, 4, generator=g) * 0.1))
    path = tmp_path / (f"in{seed}" if layout == "peft" else f"in{seed}.safetensors")
    write_adapter(a, path, layout)
    return path


def _out(tmp_path: Path, layout: str) -> Path:
    return tmp_path / ("out" if layout == "peft" else "out.safetensors")


def _run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def _same_scaled(src: Path, out: Path, factor: float) -> None:
    a, b = read_adapter(src), read_adapter(out)
    assert set(b.modules) == set(a.modules)
    for key, m in a.modules.items():
        want = factor * m.delta(torch.float64)
        assert float((b.modules[key].delta(torch.float64) - want).norm()) <= 1e-5 * float(want.norm()), key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scale_keeps_the_input_layout(tmp_path, layout):
    src, out = _input(tmp_path, layout), _out(tmp_path, layout)
    _run("scale", str(src), "0.5", "-o", str(out), "-q")
    assert read_adapter(src).source_format == layout == read_adapter(out).source_format
    _same_scaled(src, out, 0.5)


@pytest.mark.parametrize("layout", ["diffusers", "peft", "diffusers-attnproc"])
def test_resize_keeps_the_input_layout(tmp_path, layout):
    src, out = _input(tmp_path, layout), _out(tmp_path, layout)
    _run("resize", str(src), "-r", "4", "-o", str(out), "-q")  # rank 4 of rank 4: the same ΔW
    assert read_adapter(out).source_format == layout
    _same_scaled(src, out, 1.0)


@pytest.mark.parametrize("layout", ["diffusers", "peft"])
def test_mix_takes_the_first_inputs_layout(tmp_path, layout):
    first, second = _input(tmp_path, layout, 0), _input(tmp_path, "kohya", 1)
    out = _out(tmp_path, layout)
    _run("mix", f"{first}:1", f"{second}:1", "-o", str(out), "-q")
    assert read_adapter(out).source_format == layout
    to = tmp_path / "k.safetensors"
    _run("mix", f"{first}:1", f"{second}:1", "-o", str(to), "-q", "--to", "kohya")
    assert read_adapter(to).source_format == "kohya"


def test_to_overrides_and_read_only_layouts_fall_back_with_a_note(tmp_path, real_dir):
    src = _input(tmp_path, "diffusers")
    out = tmp_path / "k.safetensors"
    _run("scale", str(src), "2", "-o", str(out), "--to", "webui", "-q")
    assert read_adapter(out).source_format == "kohya"
    clone = real_dir / "adapters" / "sd15_cloneofsimo_safeloras.safetensors"
    result = CliRunner().invoke(cli, ["scale", str(clone), "1", "-o", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 0, result.output
    assert "cloneofsimo layout can only be read" in result.output and "writing kohya" in result.output
    assert read_adapter(tmp_path / "c.safetensors").source_format == "kohya"


def test_output_layout_rule():
    a = Adapter(base_model="sd1", source_format="diffusers")
    a.add(LoraModule("unet", f"{U}.attn1.to_q", down=torch.zeros(1, 320), up=torch.zeros(320, 1)))
    assert output_layout(a).name == "diffusers" and output_layout(a).note is None
    assert output_layout(a, "comfyui").name == "kohya"
    a.source_format = ["diffusers", "kohya"]
    choice = output_layout(a)
    assert choice.name == "diffusers" and "mixes diffusers, kohya" in choice.note
    a.source_format = "bfl"  # a Flux layout for an SD1 adapter: no place for it
    assert output_layout(a).name == "kohya" and "no place" in output_layout(a).note
    with pytest.raises(Exception, match="can only be read"):
        output_layout(a, "xlabs")
