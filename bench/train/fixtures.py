"""What the trainer benchmark trains on: full-size SD1.5 / SDXL diffusers folders with random weights, built
from the published configs loratool ships (loratool/train/configs), the CLIP tokenizers, and image folders.

Speed and memory do not depend on the weights' values, so random ones stand in for the real models (which
cannot be downloaded here). The tokenizers are derived from open_clip_torch's BPE list as loratool does for
single-file checkpoints (docs/TRAINING.md); ``python bench/train/fixtures.py tokenizers OUT`` writes them
as folders once (on a machine with open_clip_torch) so they can travel to one without it;
``python bench/train/fixtures.py sd15 FOLDER --tokenizers OUT`` builds a model (on CUDA).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

CLASSES = {"sd15": "sd1", "sdxl": "sdxl"}


def write_tokenizers(out: Path) -> Path:
    """``out/clip`` (padding with <|endoftext|>, SD1 and SDXL's first) and ``out/clip_bang`` (padding with
    "!", SDXL's second)."""
    from loratool.train.single_file import clip_tokenizer_from_bpe, open_clip_bpe_file

    bpe = open_clip_bpe_file()
    if bpe is None:
        raise SystemExit("open_clip_torch is not installed: its BPE list is where the tokenizer comes from")
    clip_tokenizer_from_bpe(bpe, "<|endoftext|>").save_pretrained(out / "clip")
    clip_tokenizer_from_bpe(bpe, "!").save_pretrained(out / "clip_bang")
    return out


def build_model(name: str, folder: Path, tokenizers: Path, device: str = "cuda",
                dtype: torch.dtype = torch.float16) -> Path:
    """A diffusers folder of ``name`` (sd15 or sdxl) with random weights, stored in ``dtype``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from loratool.train.single_file import shipped_configs

    if (folder / "model_index.json").is_file():
        return folder
    configs = shipped_configs(CLASSES[name])
    torch.manual_seed(0)

    def clip(key: str, cls):
        return cls(CLIPTextConfig(**{k: v for k, v in configs[key].items() if not k.startswith("_")}))

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        te = clip("text_encoder", CLIPTextModel)
        te2 = clip("text_encoder_2", CLIPTextModelWithProjection) if name == "sdxl" else None
    tok = CLIPTokenizer.from_pretrained(tokenizers / "clip")
    sched = DDIMScheduler.from_config(configs["scheduler"])
    if te2 is None:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=CLIPTokenizer.from_pretrained(tokenizers / "clip_bang"),
                                         unet=unet, scheduler=sched)
    pipe.to(dtype).save_pretrained(folder)
    return folder


def make_images(folder: Path, n: int, resolution: int, seed: int) -> Path:
    """``n`` smooth random RGB images (JPEG, as photos come) of ``resolution``² pixels."""
    from PIL import Image

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) >= n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        coarse = torch.rand(1, 3, 8, 8, generator=gen)
        img = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bicubic").clamp(0, 1)
        arr = (img[0].permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(arr, "RGB").save(folder / f"{i:04d}.jpg", quality=92)
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["tokenizers", *CLASSES], help="the tokenizer folders, or a model to build")
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizers", type=Path, help="for a model: the folder `tokenizers` wrote")
    args = ap.parse_args()
    if args.what == "tokenizers":
        write_tokenizers(args.out)
    else:
        build_model(args.what, args.out, args.tokenizers)
