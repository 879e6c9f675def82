"""``loratool train``: DreamBooth-LoRA / TriLoRA training (a thin shell over loratool.train)."""

from __future__ import annotations

import os
import time

import click

from loratool.cli.options import (
    debug_option,
    debugging,
    device_option,
    emit_json,
    force_option,
    json_option,
    quiet_option,
    resolve_device,
)


def _targets(_ctx, _param, value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


def _tokens(_ctx, _param, value: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (value or "").split(",") if t.strip())


@click.command("train")
@click.option("--model", required=True,
              help="Base model: a diffusers folder or a single-file .safetensors checkpoint (SD1.x, SD2.x, SDXL).")
@click.option("--tokenizer", type=click.Path(file_okay=False),
              help="Single-file models: a CLIP tokenizer folder (or a pipeline folder with tokenizer/).")
@click.option("--config", "model_config", type=click.Path(file_okay=False),
              help="Single-file models: a diffusers folder whose unet/vae/text_encoder/scheduler configs "
                   "replace the shipped ones (e.g. SD2 512-base: epsilon prediction).")
@click.option("--instance-data", required=True, help="Folder of instance images.")
@click.option("--instance-prompt", required=True, help='e.g. "a photo of sks dog".')
@click.option("--class-data", help="Folder of class images (missing ones are generated with the base model).")
@click.option("--class-prompt", help='e.g. "a photo of a dog" (turns on prior preservation).')
@click.option("--caption-extension", help="Read each image's caption from its sidecar file with this extension "
              "(e.g. .txt, as kohya's caption_extension); images without one use --instance-prompt/--class-prompt.")
@click.option("--num-class-images", default=100, show_default=True)
@click.option("--prior-loss-weight", default=1.0, show_default=True)
@click.option("--adapter", type=click.Choice(["lora", "trilora"]), default="lora", show_default=True)
@click.option("-r", "--rank", default=8, show_default=True)
@click.option("--alpha", type=float, help="LoRA alpha (default: the rank, scale 1).")
@click.option("--trilora-init", type=click.Choice(["svd", "orthogonal"]), default="svd", show_default=True)
@click.option("--fold", type=click.Choice(["balanced", "bc"]), default="balanced", show_default=True,
              help="How TriLoRA's B·C·A is exported as up/down.")
@click.option("--targets", default="unet", show_default=True, callback=_targets,
              help="Comma list of unet, text_encoder, vae (decoder).")
@click.option("--unet-layers", type=click.Choice(["attn", "transformer", "all"]), default="attn", show_default=True,
              help="UNet layers to adapt: attn = attention projections (diffusers' default); transformer = every "
                   "linear/1x1 layer of the transformer blocks (kohya's LoRA); all = those plus the ResNet and "
                   "up/downsampler convs (kohya's LoCon).")
@click.option("--new-tokens", callback=_tokens, help='Comma list of new tokens to learn, e.g. "<sks>".')
@click.option("--init-token", help="Existing word whose embedding starts the new tokens.")
@click.option("--steps", default=500, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--text-encoder-lr", type=float, help="Default: --lr.")
@click.option("--batch-size", default=1, show_default=True)
@click.option("--resolution", type=int, help="Training and sample size in pixels (default: the model's own: 512 "
              "for SD1.x and SD2 base, 768 for SD2 768-v, 1024 for SDXL).")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--snr-gamma", type=float, help="Min-SNR weighting γ (5 is usual).")
@click.option("--noise-offset", default=0.0, show_default=True)
@click.option("--save-every", default=0, show_default=True, help="Checkpoint every N steps (0: only at the end).")
@click.option("--resume", type=click.Path(), help="A checkpoint folder to continue from.")
@click.option("--sample-prompt", "sample_prompts", multiple=True, help="Prompt to sample during training (repeatable).")
@click.option("--sample-every", default=0, show_default=True)
@click.option("--sample-steps", default=25, show_default=True, help="Denoising steps for samples and class images.")
@click.option("--to", "output_format", type=click.Choice(["kohya", "diffusers", "peft"]), default="kohya",
              show_default=True)
@click.option("--name", "output_name", default="lora", show_default=True, help="Output file name stem.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Encode the images (and, with the text encoders frozen, the prompts) once, then train with the "
                   "UNet alone on the GPU.")
@click.option("--channels-last", is_flag=True, help="Run the UNet's convolutions in channels-last (NHWC) layout.")
@click.option("--dry-run", is_flag=True, help="Print the predicted peak GPU memory of these settings and exit "
              "(nothing is trained; no weights or images are read).")
@device_option
@force_option
@json_option
@quiet_option
@debug_option
def command(device: str, force: bool, as_json: bool, quiet: bool, dry_run: bool, **options) -> None:
    """Train a DreamBooth LoRA or TriLoRA adapter and write it for web UIs and diffusers.

    Launched by torchrun or accelerate launch, the processes train data parallel (one GPU each): every step
    takes --batch-size examples per process, and process 0 writes the outputs."""
    from loratool.train.config import TrainConfig
    from loratool.train.export import run_outputs, write_outputs
    from loratool.train.loop import Trainer

    cfg = TrainConfig(**options)
    cfg.check()
    if not debugging():
        _hush_libraries()
    if dry_run:
        _print_prediction(cfg, as_json)
        return
    # an existing output folder is refused before anything loads (other data-parallel processes only read)
    main_process = os.environ.get("RANK", "0") == "0"
    outputs = run_outputs(cfg, force=force or not main_process)
    dev = resolve_device(device)
    started = time.time()
    trainer = Trainer(cfg, dev, outputs)
    if not trainer.par.is_main:
        trainer.run()
        trainer.close()
        return
    if quiet or as_json:
        summary = trainer.run()
    else:
        summary = _run_with_progress(trainer)
    files = write_outputs(trainer, summary, started)
    trainer.close()
    result = {**summary, "adapter": cfg.adapter, "rank": cfg.rank, "files": files}
    if as_json:
        emit_json(result)
    elif not quiet:
        _print_summary(result)


def _print_prediction(cfg, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from loratool.train.memory import GIB, estimate, needed_card_bytes

    est = estimate(cfg)
    need = needed_card_bytes(est.peak)
    cards = {f"{gb} GB": need <= gb * GIB for gb in (8, 12, 16, 24, 48, 80)}
    if as_json:
        emit_json({**est.as_dict(), "card_bytes_needed": need, "fits": cards})
        return
    table = Table(title=f"predicted peak GPU memory: {cfg.adapter} rank {cfg.rank}, {cfg.resolution}px, batch "
                        f"{cfg.batch_size}", show_header=False)
    rows = [("frozen weights on the GPU", est.weights), ("adapter", est.adapter), ("optimizer (AdamW)", est.optimizer),
            ("caches (latents, text)", est.caches), ("one step: activations, gradients", est.step),
            ("training peak", est.training), ("setup peak (filling the caches)", est.setup),
            ("peak (torch.cuda.max_memory_allocated)", est.peak),
            ("a card needs about (+10 % allocator reserve, +0.5 GiB CUDA context)", need)]
    for label, n in rows:
        table.add_row(label, f"{n / GIB:.2f} GiB")
    table.add_row("fits", ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in cards.items()))
    Console().print(table)


def _hush_libraries() -> None:
    """transformers and diffusers log notes and draw their own loading bars on stderr (weights loaded,
    embeddings resized, optional torchvision missing): noise beside our progress bar, and --quiet promises
    errors only. --debug keeps them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _run_with_progress(trainer) -> dict:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cuda = trainer.device.type == "cuda"
    cols = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} it/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[mem]}")]
    with Progress(*cols, transient=False) as progress:
        task = progress.add_task("train", total=trainer.cfg.steps, completed=trainer.step_no, loss="-",
                                 speed="-", mem="")

        def update(step: int, loss: float, info: dict) -> None:
            speed = info["done"] / info["elapsed"] if info["elapsed"] else 0.0
            mem = f"GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
            progress.update(task, completed=step, loss=f"{loss:.4f}", speed=f"{speed:.2f}", mem=mem)
            for key in ("checkpoint", "samples"):
                if key in info:
                    progress.console.print(f"{key}: {info[key]}")

        return trainer.run(update)


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['adapter']} rank {result['rank']}: {result['steps']} steps", show_header=False)
    rows = {"final_loss": ("final loss", "{:.4f}"), "mean_loss_last_10": ("mean loss, last 10 steps", "{:.4f}"),
            "seconds": ("time", "{:.1f} s"), "it_per_s": ("speed", "{:.2f} it/s"),
            "trainable_parameters": ("trainable parameters", "{:,}"), "adapted_layers": ("adapted layers", "{}"),
            "peak_gpu_memory_mb": ("peak GPU memory", "{:.0f} MB"), "resumed_from": ("resumed from step", "{}")}
    for key, (label, fmt) in rows.items():
        if result.get(key) is not None and not (key == "resumed_from" and not result[key]):
            table.add_row(label, fmt.format(result[key]))
    for name, path in result["files"].items():
        table.add_row(name, path)
    Console().print(table)
