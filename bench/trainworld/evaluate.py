"""Measure a small-world pipeline with code: prompt following, subject fidelity, prior drift, collapse.

    python bench/trainworld/evaluate.py --model fixtures/tiny-sd [--lora FILE] [--device cuda]

All numbers come from ``world.detect`` (analytic template matching), pixel statistics and fixed
seeds, so two runs of the same model give the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402

SUBJECT_PROMPT = "a sks shape"
CLASS_PROMPT = "a shape"
GUIDANCE = 4.0
STEPS = 25


def load_pipeline(model: str | Path, device: str, lora: str | Path | None = None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=torch.float32)


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], batch: int = 128) -> torch.Tensor:
    """Images ``[N, 3, 32, 32]`` in [0, 1], one per (prompt, seed) pair."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator(pipe.device).manual_seed(s) for s in seeds[i:i + batch]]
        res = pipe(prompts[i:i + batch], height=32, width=32, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, generator=gens, output_type="pt")
        out.append(res.images.float().cpu())
    return torch.cat(out)


def prompt_following(pipe, n: int = 192, seed: int = 1234) -> dict:
    """Share of full-caption samples whose detected colour / shape / position match the caption."""
    scenes = world.random_scenes(n, torch.Generator().manual_seed(seed))
    imgs = sample(pipe, [s.caption() for s in scenes], list(range(n)))
    dets = [world.detect(im) for im in imgs]
    return {
        "colour": sum(d.colour == s.colour for d, s in zip(dets, scenes, strict=False)) / n,
        "shape": sum(d.shape == s.shape for d, s in zip(dets, scenes, strict=False)) / n,
        "position": sum(d.where == s.where for d, s in zip(dets, scenes, strict=False)) / n,
        "all_three": sum(d.colour == s.colour and d.shape == s.shape and d.where == s.where
                         for d, s in zip(dets, scenes, strict=False)) / n,
    }, imgs


def subject_metrics(imgs: torch.Tensor) -> dict:
    dets = [world.detect(im) for im in imgs]
    n = len(dets)
    return {
        "subject": sum(d.is_subject for d in dets) / n,
        "magenta": sum(d.colour == world.SUBJECT_COLOUR[0] for d in dets) / n,
        "cross": sum(d.shape == world.SUBJECT_SHAPE for d in dets) / n,
        "diversity": world.diversity(imgs),
        "saturated": world.saturated_fraction(imgs),
    }


def drift(base: torch.Tensor, tuned: torch.Tensor) -> float:
    """Mean RMS pixel difference between same-seed samples of two models."""
    return float(((base - tuned) ** 2).flatten(1).mean(1).sqrt().mean())


def grid(imgs: torch.Tensor, cols: int, path: Path) -> None:
    from PIL import Image

    rows = (len(imgs) + cols - 1) // cols
    pad = torch.ones(rows * cols - len(imgs), *imgs.shape[1:])
    g = torch.cat([imgs, pad]).view(rows, cols, 3, 32, 32).permute(0, 3, 1, 4, 2).reshape(rows * 32, cols * 32, 3)
    Image.fromarray((g.clamp(0, 1) * 255).round().byte().numpy()).resize((cols * 64, rows * 64), 0).save(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grid", type=Path)
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.model, args.device, args.lora)
    acc, imgs = prompt_following(pipe)
    seeds = list(range(64))
    subj = subject_metrics(sample(pipe, [SUBJECT_PROMPT] * 64, seeds))
    cls = subject_metrics(sample(pipe, [CLASS_PROMPT] * 64, seeds))
    print(json.dumps({"prompt_following": acc, "subject_prompt": subj, "class_prompt": cls}, indent=1))
    if args.grid:
        grid(imgs[:64], 16, args.grid)


if __name__ == "__main__":
    main()
