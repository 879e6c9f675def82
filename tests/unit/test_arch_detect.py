"""One detection: keys and shapes first, the file's metadata where the keys leave candidates, and a record of
which decided (issue 13: a Flux LoRA of CLIP-L alone was reported as SD1)."""

from __future__ import annotations

import pytest
import torch

from loratool.arch import detect_adapter, family_from_metadata
from loratool.formats import decode

CLIP_Q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def _lora(module_id: str, out: int, inp: int, r: int = 2) -> dict[str, torch.Tensor]:
    return {f"{module_id}.lora_down.weight": torch.zeros(r, inp), f"{module_id}.lora_up.weight": torch.zeros(out, r)}


def test_flux_lora_of_clip_l_alone_is_flux_by_its_metadata():
    """Was sd1: the keys fit every family with a CLIP-L, and the metadata was not read."""
    meta = {"ss_base_model_version": "flux1", "modelspec.architecture": "Flux.1-dev/lora"}
    a = decode(_lora(CLIP_Q, 768, 768), meta)
    assert a.base_model == "flux"
    assert a.detection.evidence == ("keys", "metadata") and a.detection.metadata_key == "modelspec.architecture"
    assert set(a.detection.candidates) == {"sd1", "sdxl", "flux", "sd3"}
    assert a.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]


def test_the_same_keys_without_metadata_keep_sd1_and_say_they_could_not_tell():
    a = decode(_lora(CLIP_Q, 768, 768))
    assert a.base_model == "sd1" and a.detection.evidence == ("keys",) and a.detection.ambiguous
    assert "keys fit sd1, sdxl, flux, sd3" in a.detection.describe()


def test_decisive_keys_overrule_wrong_metadata():
    """ai-toolkit writes ss_base_model_version sd_1.5 into Flux files."""
    t = _lora("lora_unet_single_blocks_0_linear2", 3072, 15360)
    a = decode(t, {"ss_base_model_version": "sd_1.5"})
    assert a.base_model == "flux" and a.detection.evidence == ("keys",)
    assert a.detection.metadata_family == "sd1" and "ss_base_model_version says sd1" in a.detection.describe()


@pytest.mark.parametrize("meta,config,family", [
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, None, "sdxl"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, None, "sdxl"),
    ({"ss_v2": "True"}, None, "sd2"),
    ({"ss_v2": "False"}, None, None),
    ({}, {"base_model_name_or_path": "black-forest-labs/FLUX.1-dev"}, "flux"),
    ({"lora_adapter_metadata": '{"text_encoder.base_model_name_or_path": "stabilityai/stable-diffusion-3-medium"}'},
     None, "sd3"),
    ({"modelspec.architecture": "something-else"}, None, None),
])
def test_metadata_names_a_family(meta, config, family):
    assert family_from_metadata(meta, config) == family


def test_metadata_decides_when_no_family_knows_the_keys():
    detection, places = detect_adapter([("kohya", "lora_unet", "foo_bar")], [None], {"ss_base_model_version": "flux1"})
    assert detection.family == "flux" and detection.evidence == ("metadata",)
    assert places[0].path == "foo.bar"  # still named, by the generic rules
    nothing, _ = detect_adapter([("kohya", "lora_unet", "foo_bar")], [None])
    assert nothing.family == "unknown" and nothing.evidence == () and nothing.by == "nothing"


def test_widths_tell_families_with_the_same_names_apart():
    names = [("diffusers", "transformer", "transformer_blocks.0.attn.to_q")]
    assert detect_adapter(names, [(3072, 3072)])[0].family == "flux"
    assert detect_adapter(names, [(1536, 1536)])[0].family == "sd3"
    tiny, _ = detect_adapter([("kohya", "lora_unet", "down_blocks_0_attentions_0_proj_in")], [(8, 8)])
    assert tiny.family == "sd1" and tiny.evidence == ("keys",)  # a small model in SD1's block structure


def test_peft_folder_config_names_the_family(tmp_path):
    from loratool.core.modules import Adapter, LoraModule
    from loratool.formats import read_adapter, write_adapter

    a = Adapter(base_model="flux")
    a.add(LoraModule("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", alpha=2.0,
                     down=torch.randn(2, 768), up=torch.randn(768, 2)))
    write_adapter(a, tmp_path / "p", "peft")
    back = read_adapter(tmp_path / "p")
    assert back.base_model == "flux" and "metadata" in back.detection.evidence


def test_inspect_says_how_the_base_model_was_decided(tmp_path):
    import json

    from click.testing import CliRunner

    from loratool.cli.main import cli
    from loratool.io.writer import write_safetensors

    path = tmp_path / "clip.safetensors"
    write_safetensors(path, _lora(CLIP_Q, 768, 768), {"ss_base_model_version": "flux1"})
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)[0]["base_model_detection"]
    assert found["family"] == "flux" and found["by"] == "keys+metadata" and "sd1" in found["candidates"]
    text = CliRunner().invoke(cli, ["inspect", str(path)]).output
    assert "base model: flux (by keys+metadata; keys fit flux, sd1, sdxl, sd3)" in text
