"""The SDXL path (two text encoders, pooled embeddings, size conditioning) on a tiny random SDXL pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratool.io.safetensors import SafetensorsFile
from loratool.train.config import TrainConfig
from loratool.train.export import write_outputs
from loratool.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "fixtures" / "tiny-sd"
INSTANCE = REPO / "fixtures" / "tiny-instance"


def build_tiny_sdxl(folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(TINY / "tokenizer")
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    te1, te2 = CLIPTextModel(CLIPTextConfig(**cfg)), CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    vae = AutoencoderKL.from_pretrained(TINY / "vae")
    sched = DDIMScheduler.from_pretrained(TINY / "scheduler")
    StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                              unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_sdxl_trains_and_exports_with_both_text_encoders(tmp_path):
    model = build_tiny_sdxl(tmp_path / "sdxl")
    cfg = TrainConfig(model=str(model), instance_data=str(INSTANCE), instance_prompt="a sks shape",
                      output=str(tmp_path / "out"), adapter="lora", rank=4, steps=2, lr=1e-3, resolution=16,
                      targets=("unet", "text_encoder"))
    tr = Trainer(cfg, torch.device("cpu"))
    assert tr.base.base_model == "sdxl"
    assert {k.split(".", 1)[0] for k in tr.layers} == {"unet", "text_encoder", "text_encoder_2"}
    summary = tr.run()
    assert all(torch.isfinite(torch.tensor(tr.losses))) and summary["steps"] == 2
    files = write_outputs(tr, summary, 0.0)
    f = SafetensorsFile(files["adapter"])
    prefixes = {k.split("_", 2)[1] for k in f.keys()}
    assert {"unet", "te1", "te2"} <= prefixes, prefixes
    assert f.metadata["ss_base_model_version"].startswith("sdxl")
