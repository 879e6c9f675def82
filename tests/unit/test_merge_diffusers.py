"""merge into a diffusers folder equals diffusers' own fuse_lora on the same tiny UNet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratool.core.modules import Adapter, LoraModule
from loratool.io.safetensors import SafetensorsFile
from loratool.ops.merge_stream import merge_checkpoint
from loratool.ops.mix import MixInput

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_v", "conv1", "proj_in"]


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4)


@pytest.fixture(scope="module")
def folder_and_lora(tmp_path_factory) -> tuple[Path, object, Adapter]:
    root = tmp_path_factory.mktemp("pipe")
    unet = _tiny_unet()
    unet.save_pretrained(root / "unet", safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    adapter = Adapter(base_model="unknown")
    for name, mod in unet.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            with torch.no_grad():
                a.copy_(torch.randn(a.shape, generator=g) * 0.1)
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            adapter.add(LoraModule(component="unet", path=name, alpha=2.0, down=a.detach().clone(),
                                   up=b.detach().clone()))
    return root, unet, adapter


def test_folder_merge_equals_fuse_lora(folder_and_lora, tmp_path: Path) -> None:
    root, unet, adapter = folder_and_lora
    assert len(adapter.modules) >= 6
    out = tmp_path / "baked"
    report = merge_checkpoint(root, [MixInput(adapter, 0.7)], out)
    assert report["unmatched_modules"] == 0 and report["matched_modules"] == len(adapter.modules)
    unet.fuse_lora(lora_scale=0.7)
    unet.unload_lora()
    fused = unet.state_dict()
    with SafetensorsFile(out / "unet" / "diffusion_pytorch_model.safetensors") as f:
        ours = {k: f.get(k) for k in f.keys()}
    assert set(ours) == set(fused)
    changed = 0
    for k, v in fused.items():
        assert torch.allclose(ours[k], v, atol=1e-6, rtol=1e-5), k
        changed += any(k == f"{p.split('.', 1)[1]}.weight" for p in adapter.modules)
    assert changed == len(adapter.modules)
    assert (out / "scheduler" / "scheduler_config.json").read_text() == "{}"
    assert (out / "model_index.json").exists()


def test_folder_untouched_tensors_byte_identical(folder_and_lora, tmp_path: Path) -> None:
    root, _, adapter = folder_and_lora
    out = tmp_path / "baked"
    merge_checkpoint(root, [MixInput(adapter, -1.5)], out)
    targets = {f"{p.split('.', 1)[1]}.weight" for p in adapter.modules}
    src = root / "unet" / "diffusion_pytorch_model.safetensors"
    with SafetensorsFile(src) as a, SafetensorsFile(out / "unet" / "diffusion_pytorch_model.safetensors") as b:
        for k in a.keys():
            same = bytes(a.get(k).reshape(-1).view(torch.uint8).numpy()) == bytes(b.get(k).reshape(-1).view(torch.uint8).numpy())
            assert same == (k not in targets), k
