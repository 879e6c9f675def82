"""Turning a trained run into files web UIs and diffusers load.

* the LoRA (TriLoRA folded into plain up/down factors, exact for inference) through loratool's format
  writer: kohya (default), diffusers or peft, with the training ``ss_*`` keys sd-scripts writes (those
  that apply), ``modelspec.*`` and the ``sshs_*`` hashes;
* a VAE-decoder adapter, when trained, beside it (``<name>_vae.safetensors``, keys
  ``vae.<path>.lora_down/lora_up/alpha``: the kohya layout has no VAE prefix);
* new token embeddings as textual-inversion files (``<name>_emb_<i>.safetensors``, key ``emb_params``,
  which A1111 and diffusers' ``load_textual_inversion`` read);
* ``loss.png``, the loss curve.

Every file goes through the run's :class:`~loratool.io.output.Outputs` (``run_outputs``): the output folder
is a run folder, refused when it exists and is not empty unless ``--force``; the files at fixed names are
claimed before the model loads, so a clash with an input (``--resume`` from ``checkpoint-final``) is refused
before any work.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import time
from pathlib import Path

import torch

from loratool.core.modules import Adapter
from loratool.io.output import Outputs
from loratool.train.config import TrainConfig

NETWORK_MODULE = "networks.lora"


def adapter_from_layers(layers: dict, base_model: str, fold: str = "balanced",
                        components: tuple[str, ...] | None = None) -> Adapter:
    """The canonical Adapter of the trained layers (``component.path`` keys)."""
    adapter = Adapter(base_model=base_model, source_format="loratool-train")
    for key, layer in layers.items():
        component, path = key.split(".", 1)
        if components is None or component in components:
            adapter.add(layer.to_module(component, path, fold))
    return adapter


def training_metadata(cfg: TrainConfig, summary: dict, n_instance: int, n_class: int, started: float,
                      captions: dict[str, int] | None = None) -> dict[str, str]:
    """The ``ss_*`` training keys (kohya's spelling and value style) that apply to this trainer."""
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.lr
    args = {"algo": cfg.adapter}
    if cfg.adapter == "trilora":
        args.update(trilora_init=cfg.trilora_init, fold=cfg.fold)
    if "unet" in cfg.targets and cfg.unet_layers in ("transformer+conv", "all"):  # kohya marks LoCon by conv_dim
        args.update(conv_dim=str(cfg.rank), conv_alpha=str(cfg.alpha if cfg.alpha is not None else cfg.rank))
    dirs = {Path(cfg.instance_data).name: {"n_repeats": 1, "img_count": n_instance}}
    meta = {
        "ss_session_id": str(random.Random(cfg.seed).randint(0, 2**32 - 1)),
        "ss_training_started_at": str(started), "ss_training_finished_at": str(time.time()),
        "ss_output_name": cfg.output_name, "ss_learning_rate": str(cfg.lr), "ss_unet_lr": str(cfg.lr),
        "ss_text_encoder_lr": str(te_lr), "ss_num_train_images": str(n_instance),
        "ss_num_reg_images": str(n_class), "ss_num_batches_per_epoch": str(max(1, n_instance // cfg.batch_size)),
        "ss_num_epochs": str(max(1, cfg.steps * cfg.batch_size // max(1, n_instance))),
        "ss_batch_size_per_device": str(cfg.batch_size), "ss_total_batch_size": str(cfg.batch_size),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing), "ss_gradient_accumulation_steps": "1",
        "ss_max_train_steps": str(cfg.steps), "ss_steps": str(summary.get("steps", cfg.steps)),
        "ss_lr_warmup_steps": "0", "ss_lr_scheduler": "constant", "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": "False", "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_clip_skip": "None", "ss_max_token_length": "None", "ss_cache_latents": "False",
        "ss_seed": str(cfg.seed), "ss_noise_offset": str(cfg.noise_offset) if cfg.noise_offset else "None",
        "ss_min_snr_gamma": str(cfg.snr_gamma) if cfg.snr_gamma else "None",
        "ss_prior_loss_weight": str(cfg.prior_loss_weight), "ss_optimizer": "torch.optim.AdamW(weight_decay=0.01)",
        "ss_max_grad_norm": str(cfg.max_grad_norm), "ss_sd_model_name": Path(cfg.model).name,
        "ss_dataset_dirs": json.dumps(dirs), "ss_tag_frequency": json.dumps(
            {Path(cfg.instance_data).name: tag_frequency(captions or {cfg.instance_prompt: n_instance})}),
        "ss_training_comment": f"loratool train --adapter {cfg.adapter}", "ss_network_dropout": "None",
        "ss_network_args": json.dumps(args),
    }
    if cfg.class_data:
        meta["ss_reg_dataset_dirs"] = json.dumps({Path(cfg.class_data).name: {"n_repeats": 1, "img_count": n_class}})
    return meta


def tag_frequency(captions: dict[str, int]) -> dict[str, int]:
    """kohya's ``ss_tag_frequency`` entry of one folder: how many images carry each comma-separated tag."""
    tags: dict[str, int] = {}
    for caption, n in captions.items():
        for tag in {t.strip() for t in caption.split(",") if t.strip()}:
            tags[tag] = tags.get(tag, 0) + n
    return tags


def train_inputs(cfg: TrainConfig) -> list[str]:
    """The paths a run reads (none of them is ever written)."""
    return [p for p in (cfg.model, cfg.instance_data, cfg.class_data, cfg.resume, cfg.tokenizer, cfg.model_config) if p]


def _main_components(cfg: TrainConfig) -> bool:
    return any(t in cfg.targets for t in ("unet", "text_encoder"))


def _embedding_path(cfg: TrainConfig, index: int) -> Path:
    return Path(cfg.output) / f"{cfg.output_name}_emb_{index}.safetensors"


def output_paths(cfg: TrainConfig) -> dict[str, tuple[Path, bool]]:
    """What a run writes at fixed names in its output folder: name -> (path, is a folder). Intermediate
    checkpoints and samples are written inside the run folder as they come."""
    out, name, peft = Path(cfg.output), cfg.output_name, cfg.output_format == "peft"
    paths: dict[str, tuple[Path, bool]] = {}
    if _main_components(cfg):
        paths["adapter"] = (out / (name if peft else f"{name}.safetensors"), peft)
    if "vae" in cfg.targets:
        paths["vae_adapter"] = (out / f"{name}_vae.safetensors", False)
    for i, token in enumerate(cfg.new_tokens):
        paths[f"embedding {token}"] = (_embedding_path(cfg, i), False)
    paths.update({"checkpoint": (out / "checkpoint-final", True), "losses": (out / "losses.json", False),
                  "loss_curve": (out / "loss.png", False)})
    return paths


def run_outputs(cfg: TrainConfig, *, force: bool) -> Outputs:
    """The run's outputs: its folder claimed as a run folder, the files at fixed names claimed in it."""
    # a run reads its inputs once into caches, and writes generated class images into its class folder
    outputs = Outputs(train_inputs(cfg), force=force, watch_inputs=False)
    outputs.claim(cfg.output, "output folder", folder=True, in_place=True)
    for what, (path, folder) in output_paths(cfg).items():
        outputs.claim(path, what, folder=folder)
    return outputs


def run_parameters(cfg: TrainConfig) -> dict:
    """``loratool.parameters`` of a run, in the command line's words: ``targets`` is the layer set (the one
    --targets vocabulary), ``components`` what was adapted."""
    params = {k: v for k, v in cfg.as_dict().items() if k not in ("extra", "targets", "unet_layers")}
    return {**params, "targets": cfg.unet_layers, "components": list(cfg.targets)}


def write_outputs(trainer, summary: dict, started: float) -> dict[str, str]:
    """Write every final file of a run into its output folder; name -> path."""
    from loratool.formats.write import write_adapter
    from loratool.io.metadata import loratool_keys, modelspec
    from loratool.ops.embeddings import textual_inversion

    cfg, base, outputs = trainer.cfg, trainer.base, trainer.outputs
    paths = output_paths(cfg)
    n_class = 0 if trainer.klass is None else len(trainer.klass)
    meta = training_metadata(cfg, summary, len(trainer.instance), n_class, started,
                             trainer.examples.prompt_counts("instance"))
    when = _dt.datetime.fromtimestamp(started).replace(microsecond=0).isoformat()
    meta.update(modelspec(base.base_model, cfg.output_name, date=when, resolution=f"{cfg.resolution}x{cfg.resolution}"))
    meta.update(loratool_keys("train", run_parameters(cfg)))
    files: dict[str, str] = {}
    main = [c for c in ("unet", "text_encoder", "text_encoder_2") if any(k.startswith(c + ".") for k in trainer.layers)]
    if main:
        adapter = adapter_from_layers(trainer.layers, base.base_model, cfg.fold, tuple(main))
        files["adapter"] = str(write_adapter(adapter, paths["adapter"][0], cfg.output_format, metadata=meta,
                                             outputs=outputs))
    vae = adapter_from_layers(trainer.layers, base.base_model, cfg.fold, ("vae",))
    if vae.modules:
        tensors = {}
        for m in vae.modules.values():
            tensors[f"{m.key}.lora_down"], tensors[f"{m.key}.lora_up"] = m.down, m.up
            tensors[f"{m.key}.alpha"] = torch.tensor(float(m.alpha))
        files["vae_adapter"] = str(outputs.write_safetensors(paths["vae_adapter"][0], tensors,
                                                             {"loratool.format": "loratool-vae-lora"}))
    for i, row in trainer.new_embeddings().items():
        tok_meta = {"token": cfg.new_tokens[i], "init_token": cfg.init_token or ""}
        path = outputs.write_safetensors(_embedding_path(cfg, i), textual_inversion(row.float().cpu()), tok_meta)
        files[f"embedding {cfg.new_tokens[i]}"] = str(path)
    files["checkpoint"] = str(trainer.save_checkpoint(paths["checkpoint"][0]))
    curve = loss_curve(trainer.losses, paths["loss_curve"][0], outputs)
    if curve:
        files["loss_curve"] = curve
    return files


def loss_curve(losses: list[float], path: Path, outputs: Outputs) -> str | None:
    """A PNG of the loss per step and its running mean; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="loss")
    k = max(1, len(losses) // 20)
    running = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
    ax.plot(steps, running, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    try:
        outputs.save_figure(path, fig)
    finally:
        plt.close(fig)
    return str(path)
