"""Pretrain the tiny world model and write it as a StableDiffusionPipeline folder.

    python bench/trainworld/pretrain.py -o fixtures/tiny-sd [--steps 6000 --batch 256 --device cuda]

Two phases: the one-level VAE learns to reconstruct scenes of any colour (a second or two per
hundred steps), then the UNet and the text encoder learn together from scratch (epsilon loss,
Min-SNR weighting, EMA of the weights, attribute-dropout captions). The subject of the DreamBooth
benchmark (a magenta cross) is never shown to the UNet or the text encoder. Minutes on a GPU, slow
but working on a CPU (use fewer steps and a smaller batch).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinysd  # noqa: E402
import world  # noqa: E402


def vae_scenes(n: int, gen: torch.Generator, device) -> torch.Tensor:
    """Scenes of every shape (the subject's too) in random colours: the VAE is a generic codec."""
    scenes = world.random_scenes(n, gen, shapes=world.SHAPES)
    img = world.render(scenes, device)
    mask = (img - torch.tensor(world.BACKGROUND, device=device).view(1, 3, 1, 1)).abs().amax(1, keepdim=True)
    mask = (mask / mask.amax((2, 3), keepdim=True).clamp_min(1e-6)).clamp(0, 1)
    colour = torch.rand(n, 3, 1, 1, generator=gen).to(device)
    keep = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).to(device)
    recoloured = img * (1 - mask) + colour * mask
    return torch.where(keep, img, recoloured) * 2 - 1


def train_vae(vae, steps: int, batch: int, device, gen, log) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        x = vae_scenes(batch, gen, device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-5 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.5f}")
    with torch.no_grad():
        x = vae_scenes(1024, gen, device)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return std


def encode_prompts(tok, te, prompts: list[str], device) -> torch.Tensor:
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    return te(ids)[0]


def train_unet(unet, te, vae, tok, args, device, gen, log) -> tuple:
    ddpm, _ = tinysd.schedulers()
    acp = ddpm.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warm = max(1, min(300, args.steps // 10))
    start = time.time()

    def lr_factor(s: int) -> float:  # warmup, then linear decay over steps or seconds, whichever ends first
        done = max(s / args.steps, (time.time() - start) / args.max_seconds)
        return min(1.0, (s + 1) / warm) * max(0.05, 1 - done)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_te.parameters()), params, strict=False))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    step = 0
    for step in range(args.steps):
        scenes = world.random_scenes(args.batch, gen)
        captions = world.random_captions(scenes, gen)
        with torch.no_grad():
            x = world.render(scenes, device) * 2 - 1
            lat = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        with amp:
            pred = unet(noisy, t, encode_prompts(tok, te, captions, device)).sample
        snr = acp[t] / (1 - acp[t])
        weight = snr.clamp(max=5.0) / snr
        loss = (F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in ema_pairs:
                e.lerp_(p, 1 - decay)
        if step % 250 == 0 or step == args.steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} {time.time() - start:.0f}s")
        if time.time() - start > args.max_seconds:
            log(f"stopping at step {step}: --max-seconds reached")
            break
    return ema_unet, ema_te, step + 1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-from", type=Path, help="reuse the VAE of this pipeline folder (the text side does not touch it)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-seconds", type=float, default=1e9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import CLIPTokenizer

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    tok_dir = args.out.parent / (args.out.name + "-tokenizer-src")
    tinysd.write_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    te, vae, unet = (m.to(device) for m in tinysd.build_models(len(tok)))
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.time()
    if args.vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(args.vae_from / "vae")).to(device, torch.float32)
        std, args.vae_steps = 1.0 / vae.config.scaling_factor, 0
        log(f"vae reused from {args.vae_from}")
    else:
        std = train_vae(vae, args.vae_steps, args.batch, device, gen, log)
    vae.requires_grad_(False).eval()
    t1 = time.time()
    unet_ema, te_ema, done = train_unet(unet, te, vae, tok, args, device, gen, log)
    t2 = time.time()
    tinysd.save_pipeline(args.out, te_ema.cpu(), vae.cpu(), unet_ema.cpu(), tok_dir)
    info = {"unet_steps": done, "vae_steps": args.vae_steps, "batch": args.batch, "lr": args.lr,
            "seed": args.seed, "device": str(device), "vae_from": str(args.vae_from or ""), "latent_std": std,
            "vae_seconds": round(t1 - t0, 1), "unet_seconds": round(t2 - t1, 1)}
    (args.out / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    log(json.dumps(info))


if __name__ == "__main__":
    main()
