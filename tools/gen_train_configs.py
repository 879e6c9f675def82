"""Write loratool/train/configs/{sd1,sd2,sdxl}.json: the configs single-file training builds models from.

Run:  python tools/gen_train_configs.py

Architecture facts (the same as tools/gen_arch_tables.py): SD1 UNet (cross-attention 768, 8 heads), SD2
UNet (1024, head dims 5/10/20/20, linear projections, 768-v: v_prediction, sample size 96), SDXL UNet
(3 levels, 1/2/10 transformer layers, 2048, text_time embedding); the KL VAE (scaling 0.18215, SDXL
0.13025); CLIP-L (768 wide, 12 layers, quick_gelu), OpenCLIP-H as HF CLIP (1024, 23 layers, gelu,
projection 512), OpenCLIP-G (1280, 32 layers, gelu, projection 1280); the scaled-linear DDPM schedule
0.00085..0.012 over 1000 steps. Full configs are dumped so that later default changes do not alter them.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig

OUT = Path(__file__).resolve().parents[1] / "loratool" / "train" / "configs"

def clean(cfg):
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
def clip(h, inter, layers, heads, act, proj):
    c = CLIPTextConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=77, vocab_size=49408, hidden_act=act, projection_dim=proj,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    d = c.to_diff_dict()
    d.pop("transformers_version", None)
    d.pop("architectures", None)
    d.update(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
             max_position_embeddings=77, vocab_size=49408, hidden_act=act, projection_dim=proj,
             bos_token_id=49406, eos_token_id=49407, pad_token_id=1, model_type="clip_text_model")
    return d
def vae(sample, scale, upcast):
    with torch.device("meta"):
        m = AutoencoderKL(block_out_channels=(128,256,512,512), down_block_types=("DownEncoderBlock2D",)*4,
            up_block_types=("UpDecoderBlock2D",)*4, layers_per_block=2, latent_channels=4, sample_size=sample,
            scaling_factor=scale, force_upcast=upcast)
    return clean(m.config)
def sched(pred):
    return clean(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=pred, clip_sample=False, steps_offset=1, timestep_spacing="leading").config)
def main() -> None:
    with torch.device("meta"):
        u1 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        u2 = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5,10,20,20], use_linear_projection=True)
        ux = UNet2DConditionModel(sample_size=128,
            down_block_types=("DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"), block_out_channels=(320,640,1280),
            transformer_layers_per_block=[1,2,10], cross_attention_dim=2048, attention_head_dim=[5,10,20],
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    out = {
     "sd1": {"unet": clean(u1.config), "vae": vae(512, 0.18215, True), "text_encoder": clip(768,3072,12,12,"quick_gelu",768), "scheduler": sched("epsilon")},
     "sd2": {"unet": clean(u2.config), "vae": vae(768, 0.18215, True), "text_encoder": clip(1024,4096,23,16,"gelu",512), "scheduler": sched("v_prediction")},
     "sdxl": {"unet": clean(ux.config), "vae": vae(1024, 0.13025, True), "text_encoder": clip(768,3072,12,12,"quick_gelu",768),
              "text_encoder_2": clip(1280,5120,32,20,"gelu",1280), "scheduler": sched("epsilon")},
    }
    for k, v in out.items():
        (OUT / f"{k}.json").write_text(json.dumps(v, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
