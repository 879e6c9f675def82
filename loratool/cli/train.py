"""``loratool train``: DreamBooth-LoRA / TriLoRA training (a thin shell over loratool.train)."""

from __future__ import annotations

import dataclasses
import importlib.util
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
    targets_help,
)
from loratool.errors import LoraToolError

COMPONENTS = ("unet", "text_encoder", "vae")
EXTRA = "pip install 'loratool[train]'"
NEEDS = ("diffusers", "transformers", "PIL")  # what the [train] extra installs (PIL: pillow)


def _components(_ctx, _param, value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(t.strip() for t in value.split(",") if t.strip())


def _targets(_ctx, _param, value: str | None) -> str | tuple[str, ...] | None:
    """A layer set of the one vocabulary, or (the old meaning of train's --targets) a comma list of
    components, kept working."""
    if value is None:
        return None
    from loratool.arch.table import TARGET_ALIASES, TARGET_SETS

    name = TARGET_ALIASES.get(value.strip(), value.strip())
    if name in TARGET_SETS:
        return name
    parts = tuple(t.strip() for t in value.split(",") if t.strip())
    if parts and all(p in COMPONENTS for p in parts):
        return parts
    raise click.BadParameter(f"{value!r}: use one of {', '.join(TARGET_SETS)} (which layers), and --components "
                             f"for {', '.join(COMPONENTS)}", param_hint="--targets")


def layer_and_components(targets, components, unet_layers) -> tuple[str, tuple[str, ...]]:
    """(layer set, components) from --targets, --components and the old --unet-layers."""
    from loratool.train.layers import OLD_UNET_LAYERS

    legacy = targets if isinstance(targets, tuple) else None
    if legacy is not None and components is not None:
        raise click.UsageError("--targets unet,text_encoder is the old spelling of --components: give one of them")
    if unet_layers is not None and isinstance(targets, str):
        raise click.UsageError("--unet-layers is the old spelling of --targets: give one of them")
    layers = targets if isinstance(targets, str) else OLD_UNET_LAYERS[unet_layers] if unet_layers else "attn"
    return layers, components or legacy or ("unet",)


def check_extra() -> None:
    """One line naming the install when the [train] extra is missing (diffusers is not a core dependency)."""
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join("pillow" if m == "PIL" else m for m in missing)
        raise LoraToolError(f"train needs the [train] extra, which is not installed ({names} missing): {EXTRA}")


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
@click.option("--targets", default=None, callback=_targets, metavar="attn|transformer|transformer+conv|all",
              help=targets_help("Which layers of the UNet and text encoders get an adapter [default: attn]: "))
@click.option("--components", default=None, callback=_components, metavar="unet,text_encoder,vae",
              help="Comma list of what to adapt: unet, text_encoder, vae (its decoder)  [default: unet]")
@click.option("--unet-layers", type=click.Choice(["attn", "transformer", "all"]), default=None, hidden=True,
              help="The old spelling of --targets (all = transformer+conv).")
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
@click.option("--recompute-pointwise", is_flag=True,
              help="Recompute the UNet's GroupNorm+SiLU and GEGLU in the backward pass instead of keeping their "
                   "outputs: less activation memory for a little more time (moot with --gradient-checkpointing).")
@click.option("--compile", "compile_unet", is_flag=True,
              help="Run the UNet's training step through torch.compile: fewer kernel launches and fused element-wise "
                   "work, for hosts that cannot keep the GPU busy; the first step takes a minute or more to compile "
                   "(needs a C++ compiler; Triton on CUDA).")
@click.option("--dry-run", is_flag=True, help="Print the predicted peak GPU memory of these settings and exit "
              "(nothing is trained; no weights or images are read).")
@device_option
@force_option
@json_option
@quiet_option
@debug_option
def command(device: str, force: bool, as_json: bool, quiet: bool, dry_run: bool, targets, components, unet_layers,
            **options) -> None:
    """Train a DreamBooth LoRA or TriLoRA adapter and write it for web UIs and diffusers.

    Needs the [train] extra (diffusers, transformers, pillow): pip install 'loratool[train]'

    Launched by torchrun or accelerate launch, the processes train data parallel (one GPU each): every step
    takes --batch-size examples per process, and process 0 writes the outputs."""
    layers, comps = layer_and_components(targets, components, unet_layers)
    if isinstance(targets, tuple) and not quiet:
        click.echo(f"loratool: note: --targets {','.join(targets)} names components: --components says that now "
                   f"(--targets takes the layer set, here {layers})", err=True)
    check_extra()
    from loratool.train.config import TrainConfig
    from loratool.train.export import run_outputs, write_outputs
    from loratool.train.loop import Trainer

    cfg = TrainConfig(**options, targets=comps, unet_layers=layers)
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
    from rich.table import Table

    from loratool.cli.render import console
    from loratool.train.memory import GIB, estimate, needed_card_bytes

    est = estimate(cfg)
    need = needed_card_bytes(est.peak)
    cards = {f"{gb} GB": need <= gb * GIB for gb in (8, 12, 16, 24, 48, 80)}
    savers = {}  # what each memory-saving option would make of the peak, where none is asked for
    if not (cfg.gradient_checkpointing or cfg.recompute_pointwise or cfg.compile_unet):
        for flag in ("recompute_pointwise", "gradient_checkpointing"):
            savers[flag] = estimate(dataclasses.replace(cfg, **{flag: True})).peak
    if as_json:
        emit_json({**est.as_dict(), "card_bytes_needed": need, "fits": cards, "peak_with": savers})
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
    for flag, peak in savers.items():
        table.add_row(f"peak with --{flag.replace('_', '-')}", f"{peak / GIB:.2f} GiB")
    console().print(table)


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
    """The run with the one progress display: a bar on a terminal, ten plain lines on stderr off one (under
    nohup, in a notebook, piped to a log)."""
    import torch

    from loratool.cli.render import progress

    cuda = trainer.device.type == "cuda"
    with progress("train", trainer.cfg.steps, unit="steps", lines=10) as bar:
        bar.update(trainer.step_no)

        def update(step: int, loss: float, info: dict) -> None:
            speed = info["done"] / info["elapsed"] if info["elapsed"] else 0.0
            mem = f", GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
            bar.update(step, note=f"loss {loss:.4f}, {speed:.2f} it/s{mem}")
            for key in ("checkpoint", "samples"):
                if key in info:
                    bar.print(f"{key}: {info[key]}")

        return trainer.run(update)


def _print_summary(result: dict) -> None:
    from rich.table import Table

    from loratool.cli.render import console

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
    console().print(table)
