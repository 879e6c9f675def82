"""Metadata of a converted file: training record kept, network keys and modelspec set for the target."""

from __future__ import annotations

import json

import torch

from loratool.core.modules import Adapter, LokrModule, LoraModule
from loratool.ops.convert import convert
from loratool.ops.convert_meta import target_metadata

SOURCE = {
    "ss_network_module": "networks.lora", "ss_network_dim": "999", "ss_network_alpha": "1.0",
    "ss_learning_rate": "0.0001", "ss_tag_frequency": '{"a": {"x": 1}}', "ss_output_name": "mylora",
    "ss_network_args": '{"conv_dim": "4"}', "sshs_model_hash": "stale", "sshs_legacy_hash": "stale",
    "modelspec.title": "My LoRA", "modelspec.date": "2024-01-02T03:04:05", "other": "dropped",
}


def _adapter(alphas=(8.0, 8.0), ranks=(4, 4), base="sdxl") -> Adapter:
    a = Adapter(base_model=base, source_format="kohya", metadata=dict(SOURCE))
    for i, (alpha, r) in enumerate(zip(alphas, ranks, strict=True)):
        a.add(LoraModule("unet", f"down_blocks.1.attentions.0.transformer_blocks.{i}.attn1.to_q", alpha=alpha,
                         down=torch.ones(r, 8), up=torch.ones(8, r)))
    return a


def test_training_record_kept_network_keys_set_for_target():
    src = _adapter()
    out, report = convert(src, "kohya")
    meta = target_metadata(src.metadata, out, report, parameters={"to": "kohya"})
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_tag_frequency"] == SOURCE["ss_tag_frequency"]
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4"}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.title"] == "My LoRA" and meta["modelspec.date"] == SOURCE["modelspec.date"]
    assert not any(k.startswith("sshs_") for k in meta) and "other" not in meta
    summary = json.loads(meta["loratool.convert"])
    assert summary == {"from": "kohya", "to": "kohya", "exact": True, "modules": {"rename": 2}}
    assert meta["loratool.command"] == "convert" and json.loads(meta["loratool.parameters"]) == {"to": "kohya"}


def test_mixed_ranks_and_alphas_are_dynamic():
    src = _adapter(alphas=(8.0, 2.0), ranks=(4, 8))
    out, report = convert(src, "kohya")
    meta = target_metadata(src.metadata, out, report)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"


def test_lycoris_module_and_non_kohya_targets():
    a = Adapter(base_model="sd1", source_format="lycoris", metadata={"ss_network_module": "lycoris.kohya"})
    a.add(LokrModule("unet", "conv_in", alpha=1.0, w1=torch.eye(2), w2=torch.ones(4, 4)))
    out, report = convert(a, "kohya")
    assert target_metadata(a.metadata, out, report)["ss_network_module"] == "lycoris.kohya"
    low, report = convert(a, "diffusers", rank=2)
    meta = target_metadata(a.metadata, low, report)
    assert "ss_network_module" not in meta  # a kohya module name would not describe a diffusers file
    summary = json.loads(meta["loratool.convert"])
    assert summary["exact"] is False and summary["modules"] == {"svd": 1} and "max_rel_error" in summary


def test_flux_kohya_module_name():
    a = Adapter(base_model="flux", source_format="diffusers")
    a.add(LoraModule("transformer", "single_transformer_blocks.0.proj_out", alpha=4.0, down=torch.ones(4, 8),
                     up=torch.ones(8, 4)))
    out, report = convert(a, "kohya")
    meta = target_metadata({}, out, report)
    assert meta["ss_network_module"] == "networks.lora_flux" and "modelspec.prediction_type" not in meta


def test_tucker_lora_is_a_lycoris_module_in_both_writers():
    """A LoRA with a Tucker mid factor needs LyCORIS; convert's metadata and the file writer agree."""
    from loratool.formats.kohya import network_module

    a = Adapter(base_model="sd1", source_format="lycoris")
    a.add(LoraModule("unet", "down_blocks.0.resnets.0.conv1", alpha=2.0, down=torch.ones(2, 4, 1, 1),
                     mid=torch.ones(2, 2, 3, 3), up=torch.ones(8, 2, 1, 1)))
    out, report = convert(a, "kohya")
    assert target_metadata(a.metadata, out, report)["ss_network_module"] == "lycoris.kohya"
    assert network_module(out) == "lycoris.kohya"
    plain = _adapter(base="flux")
    assert network_module(plain) == "networks.lora_flux"
