"""DreamBooth-LoRA / TriLoRA training: setting up, one step, the whole run.

One step (epsilon or v-prediction, as the model's scheduler says):

1. draw ``batch_size`` instance images (and as many class images with prior preservation);
2. encode them with the frozen VAE, add DDPM noise at uniform timesteps (plus ``noise_offset``·N(0,1)
   per channel), encode the prompts;
3. per-sample MSE of the UNet's prediction, weighted ``min(SNR, γ)/SNR`` under ``--snr-gamma``
   (``/(SNR+1)`` for v-prediction); loss = instance mean + ``prior_loss_weight`` · class mean;
4. with ``vae`` among the targets, the decoder's LoRA learns to rebuild the instance images from
   their latents (a pixel MSE added to the loss);
5. clip the gradient norm, AdamW step.

All randomness (image choice, noise, timesteps, VAE sampling) comes from one seeded generator, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from loratool.errors import LoraToolError
from loratool.io.output import Outputs
from loratool.train import checkpoint, data
from loratool.train.config import TrainConfig
from loratool.train.export import run_outputs
from loratool.train.layers import adapt, target_names
from loratool.train.model import add_tokens, encode_prompts, load_base

Callback = Callable[[int, float, dict], None]


class Trainer:
    def __init__(self, cfg: TrainConfig, device: torch.device, outputs: Outputs | None = None) -> None:
        cfg.check()
        self.outputs = outputs if outputs is not None else run_outputs(cfg, force=True)  # every file goes here
        self.cfg, self.device = cfg, device
        if cfg.mixed_precision != "no" and device.type != "cuda":
            if cfg.mixed_precision == "fp16":
                raise LoraToolError("--mixed-precision fp16 needs a CUDA device")
        self.out = Path(cfg.output)
        if cfg.resolution is not None:  # bad images fail before the model loads
            self.instance, instance_prompts = self._instance_images()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.base = load_base(cfg.model, device, cfg.tokenizer, cfg.model_config)
        if cfg.resolution is None:
            cfg.resolution = self.base.native_resolution
            self.instance, instance_prompts = self._instance_images()
        self.token_ids = add_tokens(self.base, list(cfg.new_tokens), cfg.init_token) if cfg.new_tokens else []
        self.klass, class_prompts = self._class_images() if cfg.class_data else (None, None)
        self.examples = data.Examples(self.instance, instance_prompts, self.klass, class_prompts)
        self.layers = self._adapt()
        self.optimizer = self._optimizer()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        self.scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
        if cfg.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
            if "text_encoder" in cfg.targets:
                for te in self.base.text_encoders:
                    te.gradient_checkpointing_enable()
        self.step_no, self.losses = 0, []
        if cfg.resume:
            self._resume(Path(cfg.resume))

    # -- setup -------------------------------------------------------------------------------
    def _instance_images(self) -> tuple[torch.Tensor, list[str]]:
        cfg = self.cfg
        return data.load_captioned(cfg.instance_data, cfg.resolution, "instance image folder", cfg.instance_prompt,
                                   cfg.caption_extension)

    def _class_images(self) -> tuple[torch.Tensor, list[str]]:
        cfg, folder = self.cfg, Path(self.cfg.class_data)
        if folder.exists() and not folder.is_dir():
            raise LoraToolError("class image folder is not a folder", folder)
        have = len(data.image_files(folder, "class image folder", allow_empty=True)) if folder.exists() else 0
        if have < cfg.num_class_images:
            data.generate_class_images(self.base.pipeline(), folder, cfg.class_prompt, cfg.num_class_images,
                                       cfg.resolution, cfg.seed, steps=cfg.sample_steps)
        return data.load_captioned(folder, cfg.resolution, "class image folder", cfg.class_prompt, cfg.caption_extension)

    def _adapt(self) -> dict:
        cfg, layers = self.cfg, {}
        for component, model in self.base.components.items():
            wanted = component if not component.startswith("text_encoder") else "text_encoder"
            if wanted not in cfg.targets:
                continue
            names = target_names(model, component, cfg.unet_layers)
            if not names:
                raise LoraToolError(f"--targets {component}: no layers to adapt in this model", cfg.model)
            for name, layer in adapt(model, names, cfg.adapter, cfg.rank, cfg.alpha, cfg.trilora_init, self.gen).items():
                layers[f"{component}.{name}"] = layer
        if self.device.type == "cuda" and cfg.mixed_precision != "no":
            dtype = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
            for model in self.base.components.values():
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(dtype)
        return layers

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.lr
        groups: dict[str, list] = {"unet": [], "text_encoder": [], "vae": []}
        for key, layer in self.layers.items():
            comp = key.split(".", 1)[0]
            groups["text_encoder" if comp.startswith("text_encoder") else comp] += list(layer.factors().values())
        params = [{"params": groups["unet"] + groups["vae"], "lr": cfg.lr, "weight_decay": 1e-2},
                  {"params": groups["text_encoder"], "lr": te_lr, "weight_decay": 1e-2}]
        if self.token_ids:
            table = self.base.text_encoders[0].get_input_embeddings().weight
            table.requires_grad_(True)
            keep = torch.zeros(table.shape[0], 1, device=table.device)
            keep[self.token_ids] = 1.0
            table.register_hook(lambda g: g * keep.to(g.dtype))  # only the new rows learn
            params.append({"params": [table], "lr": te_lr, "weight_decay": 0.0})
        return torch.optim.AdamW([g for g in params if g["params"]], betas=(0.9, 0.999), eps=1e-8)

    def checkpoint_meta(self) -> dict[str, str]:
        cfg = self.cfg
        return {"loratool.adapter": cfg.adapter, "loratool.rank": str(cfg.rank),
                "loratool.alpha": str(float(cfg.alpha if cfg.alpha is not None else cfg.rank)),
                "loratool.trilora_init": cfg.trilora_init if cfg.adapter == "trilora" else "",
                "loratool.targets": checkpoint.json_list(cfg.targets),
                "loratool.unet_layers": cfg.unet_layers if "unet" in cfg.targets else "",
                "loratool.new_tokens": checkpoint.json_list(cfg.new_tokens)}

    def _resume(self, folder: Path) -> None:
        checkpoint.check_compatible(folder, self.checkpoint_meta())
        table = self.base.text_encoders[0].get_input_embeddings().weight if self.token_ids else None
        rows = dict(enumerate(self.token_ids))
        self.step_no, self.losses = checkpoint.load(folder, self.layers, rows, table, self.optimizer, self.gen)

    def new_embeddings(self) -> dict[int, torch.Tensor]:
        if not self.token_ids:
            return {}
        table = self.base.text_encoders[0].get_input_embeddings().weight
        return {i: table[row] for i, row in enumerate(self.token_ids)}

    def save_checkpoint(self, folder: Path) -> Path:
        return checkpoint.save(folder, self.layers, self.new_embeddings(), self.checkpoint_meta(), self.optimizer,
                               self.step_no, self.gen, self.losses, self.outputs)

    # -- training ----------------------------------------------------------------------------
    def loss(self) -> torch.Tensor:
        cfg, base, dev = self.cfg, self.base, self.device
        pixels, prompts, n_inst = self.examples.batch(cfg.batch_size, self.gen)
        pixels = pixels.to(dev)
        sched = base.noise_scheduler
        with self.autocast:
            with torch.no_grad():
                dist = base.vae.encode(pixels.to(base.vae.dtype)).latent_dist
                raw = dist.sample(generator=self.gen).float()
            latents = raw * base.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=self.gen).to(dev)
            if cfg.noise_offset:
                noise = noise + cfg.noise_offset * torch.randn(*latents.shape[:2], 1, 1, generator=self.gen).to(dev)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=self.gen).to(dev)
            noisy = sched.add_noise(latents, noise, t)
            states, cond = encode_prompts(base, prompts, cfg.resolution)
            pred = base.unet(noisy, t, states, added_cond_kwargs=cond).sample.float()
        v_pred = sched.config.prediction_type == "v_prediction"
        target = sched.get_velocity(latents, noise, t) if v_pred else noise
        per = F.mse_loss(pred[:, : target.shape[1]], target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma:
            acp = sched.alphas_cumprod.to(dev)[t]
            snr = acp / (1 - acp)
            per = per * snr.clamp(max=cfg.snr_gamma) / (snr + 1 if v_pred else snr)
        loss = per[:n_inst].mean()
        if n_inst < len(per):
            loss = loss + cfg.prior_loss_weight * per[n_inst:].mean()
        if "vae" in cfg.targets:
            with self.autocast:
                rec = base.vae.decode(raw[:n_inst].to(base.vae.dtype)).sample.float()
            loss = loss + F.mse_loss(rec, pixels[:n_inst].float())
        return loss

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        if not torch.isfinite(loss):
            raise LoraToolError(f"the loss became {loss.item()} at step {self.step_no + 1} (try a lower --lr)")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params(), self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step_no += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        """Images ``[N, 3, res, res]`` in [0, 1] from the adapted model."""
        pipe = self.base.pipeline()
        gens = [torch.Generator(self.device).manual_seed(seed + i) for i in range(len(prompts))]
        with self.autocast:
            out = pipe(prompts, height=self.cfg.resolution, width=self.cfg.resolution, guidance_scale=5.0,
                       num_inference_steps=self.cfg.sample_steps, generator=gens, output_type="pt")
        return out.images.float().cpu()

    def save_samples(self) -> Path:
        imgs = self.sample(list(self.cfg.sample_prompts), seed=self.cfg.seed)
        grid = torch.cat(list(imgs), dim=2)  # one row, prompts left to right
        path = self.out / "samples" / f"step_{self.step_no:06d}.png"
        with self.outputs.file(path) as fh:
            data.save_image(grid, fh)
        return path

    def run(self, callback: Callback | None = None) -> dict:
        """Train to ``cfg.steps``; checkpoints and samples on schedule; returns a summary."""
        cfg, start = self.cfg, time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        first = self.step_no
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stepping = 0.0  # seconds spent in training steps (not sampling or saving)
        while self.step_no < cfg.steps:
            t0 = time.time()
            loss = self.step()
            stepping += time.time() - t0
            info = {"elapsed": stepping, "done": self.step_no - first}
            if cfg.save_every and self.step_no % cfg.save_every == 0 and self.step_no < cfg.steps:
                info["checkpoint"] = str(self.save_checkpoint(self.out / f"checkpoint-{self.step_no:06d}"))
            if cfg.sample_prompts and cfg.sample_every and self.step_no % cfg.sample_every == 0:
                info["samples"] = str(self.save_samples())
            if callback:
                callback(self.step_no, loss, info)
        elapsed = time.time() - start
        summary = {"steps": self.step_no, "resumed_from": first, "seconds": round(elapsed, 2),
                   "it_per_s": round((self.step_no - first) / stepping, 3) if stepping else None,
                   "final_loss": self.losses[-1] if self.losses else None,
                   "mean_loss_last_10": sum(self.losses[-10:]) / max(1, len(self.losses[-10:])),
                   "trainable_parameters": sum(p.numel() for p in self.params()),
                   "adapted_layers": len(self.layers),
                   "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                   if self.device.type == "cuda" else None}
        self.outputs.write_json(self.out / "losses.json", self.losses)
        return summary
