"""The PATH[:weight][:lbw=...] spec parser and per-module block weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratool.core.modules import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.ops.lbw import InputSpec, module_weights, parse_input_spec


@pytest.fixture
def lora_path(tmp_path: Path) -> Path:
    p = tmp_path / "a.safetensors"
    p.write_bytes(b"x")
    return p


@pytest.mark.parametrize(("suffix", "weight", "lbw"), [
    ("", 1.0, None), (":0.7", 0.7, None), (":-1.5", -1.5, None), (":1e-1", 0.1, None),
    (":0.7:lbw=1,0,0", 0.7, "1,0,0"), (":lbw=INS", 1.0, "INS"), (":0.5:OUTD", 0.5, "OUTD"),
    (":-0.5:1,0,1", -0.5, "1,0,1"),
])
def test_parse(lora_path: Path, suffix: str, weight: float, lbw: str | None) -> None:
    assert parse_input_spec(f"{lora_path}{suffix}") == InputSpec(str(lora_path), weight, lbw)


def test_existing_path_with_colons_wins(tmp_path: Path) -> None:
    odd = tmp_path / "x:0.5"
    odd.write_bytes(b"x")
    assert parse_input_spec(str(odd)) == InputSpec(str(odd), 1.0, None)
    assert parse_input_spec(f"{odd}:2") == InputSpec(str(odd), 2.0, None)


def test_errors(lora_path: Path, tmp_path: Path) -> None:
    with pytest.raises(LoraToolError, match="no such file"):
        parse_input_spec(str(tmp_path / "missing.safetensors:0.5"))
    with pytest.raises(LoraToolError, match="contains ':'"):
        parse_input_spec(f"{lora_path}:half")
    with pytest.raises(LoraToolError, match="empty block-weight"):
        parse_input_spec(f"{lora_path}:1:lbw=")
    with pytest.raises(LoraToolError, match="finite"):
        parse_input_spec(f"{lora_path}:nan")
    assert parse_input_spec("nothing:0.5", must_exist=False) == InputSpec("nothing", 0.5, None)


def _sd1_adapter(base: str = "sd1") -> Adapter:
    a = Adapter(base_model=base)
    for key in ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
                "unet.not_a_real.layer"):
        comp, path = key.split(".", 1)
        a.add(LoraModule(component=comp, path=path, alpha=1.0, down=torch.zeros(1, 4), up=torch.zeros(4, 1)))
    return a


def test_module_weights_from_the_arch_table() -> None:
    a = _sd1_adapter()
    # 26 values: BASE, IN00..IN11, MID, OUT00..OUT11 — give every slot a distinct weight
    values = [round(0.1 * i, 1) for i in range(26)]
    bw = module_weights(a, 2.0, ",".join(map(str, values)))
    w = bw.weights
    assert w["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == pytest.approx(2 * values[0])
    assert w["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == pytest.approx(2 * values[1 + 4])
    assert w["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"] == pytest.approx(2 * values[13])
    assert w["unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k"] == pytest.approx(2 * values[14 + 11])
    assert bw.unblocked == ["unet.not_a_real.layer"] and w["unet.not_a_real.layer"] == 2.0
    assert module_weights(a, 0.3).weights == dict.fromkeys(a.modules, 0.3)


def test_module_weights_need_a_known_base() -> None:
    with pytest.raises(LoraToolError, match="base model"):
        module_weights(_sd1_adapter("unknown"), 1.0, "ALL")
    assert module_weights(_sd1_adapter("unknown"), 1.0, "ALL", arch_name="sd1").weights
    with pytest.raises(LoraToolError, match="values"):
        module_weights(_sd1_adapter(), 1.0, "1,0")
