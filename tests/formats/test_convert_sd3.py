"""SD3's fused q/k/v (sd-scripts' ``joint_blocks_N_x_block_attn_qkv`` and ``…_context_block_attn_qkv``, as SAI
checkpoints store them) leave kohya in every direction, exactly, the way Flux's do (issue 13: --to diffusers
and --to peft stopped with "…to_added_qkv is a fused (BFL/SAI) weight")."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.formats import read_adapter
from loratool.io.writer import write_safetensors

H = 1536  # SD3 Medium's hidden size


def _kohya_sd3(path):
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for module, out, inp in (("lora_unet_joint_blocks_0_x_block_attn_qkv", 3 * H, H),
                             ("lora_unet_joint_blocks_0_context_block_attn_qkv", 3 * H, H),
                             ("lora_unet_joint_blocks_0_x_block_attn_proj", H, H),
                             ("lora_unet_joint_blocks_23_context_block_attn_qkv", 3 * H, H)):
        tensors[f"{module}.lora_down.weight"] = torch.randn(4, inp, generator=g)
        tensors[f"{module}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.1
        tensors[f"{module}.alpha"] = torch.tensor(2.0)
    write_safetensors(path, tensors, {"ss_network_module": "networks.lora_sd3"})


def _delta_by_part(adapter) -> dict[str, torch.Tensor]:
    """ΔW per split projection (fused modules cut at their rows), in float64."""
    from loratool.arch import family

    fused = family("sd3").fused
    out = {}
    for key, m in adapter.modules.items():
        delta = m.delta(torch.float64)
        for part, (r0, r1) in fused.get(key, [(key, (0, delta.shape[0]))]):
            out[part] = delta[r0:r1]
    return out


@pytest.mark.parametrize("to", ["diffusers", "peft", "onetrainer", "lycoris", "bfl"])
def test_kohya_sd3_converts_out_and_back_exactly(tmp_path, to):
    src = tmp_path / "sd3.safetensors"
    _kohya_sd3(src)
    source = read_adapter(src)
    assert source.base_model == "sd3" and source.source_format == "kohya" and not source.unknown
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    result = CliRunner().invoke(cli, ["convert", str(src), "--to", to, "-o", str(out)])
    assert result.exit_code == 0, result.output
    middle = read_adapter(out)
    assert middle.base_model == "sd3" and middle.source_format == to
    back = tmp_path / "back.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(out), "--to", "kohya", "-o", str(back)])
    assert result.exit_code == 0, result.output
    want = _delta_by_part(source)
    for got in (_delta_by_part(middle), _delta_by_part(read_adapter(back))):
        assert set(got) == set(want)
        for key, delta in want.items():
            assert torch.allclose(got[key], delta, rtol=1e-5, atol=1e-7), key
    from loratool.io.safetensors import SafetensorsFile

    with SafetensorsFile(back) as f, SafetensorsFile(src) as g:  # the same kohya names come back
        assert {k.split(".")[0] for k in f.keys()} == {k.split(".")[0] for k in g.keys()}


def test_a_layout_of_another_family_is_one_line(tmp_path):
    src = tmp_path / "sd3.safetensors"
    _kohya_sd3(src)
    result = CliRunner().invoke(cli, ["convert", str(src), "--to", "aitoolkit", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code != 0 and "no place for a sd3 adapter" in result.output
    assert not (tmp_path / "x.safetensors").exists()
