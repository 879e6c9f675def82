"""What a training step minimises (epsilon or v-prediction, as the model's scheduler says):

1. draw ``batch_size`` instance images (and as many class images with prior preservation);
2. take their latents (from the latent cache, or by encoding them with the frozen VAE), add DDPM noise at
   uniform timesteps (plus ``noise_offset``·N(0,1) per channel), condition on the prompts (from the text
   cache, or by running the text encoders);
3. per-sample MSE of the UNet's prediction, weighted ``min(SNR, γ)/SNR`` under ``--snr-gamma``
   (``/(SNR+1)`` for v-prediction); loss = instance mean + ``prior_loss_weight`` · class mean;
4. with ``vae`` among the targets, the decoder's LoRA learns to rebuild the instance images from
   their latents (a pixel MSE added to the loss).

All randomness (image choice, VAE sampling, noise, timesteps) comes from the run's one seeded CPU
generator, so a run resumed from a checkpoint continues exactly as the uninterrupted run would, and the
CPU and CUDA take the same steps. On CUDA computing the loss never waits for the GPU: the inputs are
copied from pinned memory and the loss stays on the device (loratool.train.loop reads it back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loratool.train import cache, data, parallel
from loratool.train.config import TrainConfig
from loratool.train.model import BaseModel, encode_tokens, size_ids, tokenize


class Objective:
    """The loss of one step. What every step reads from the device is put there once, when this is built,
    with the DDP wrappers that average the gradients of several processes."""

    def __init__(self, cfg: TrainConfig, base: BaseModel, examples: data.Examples,
                 latents: cache.LatentCache | None, texts: cache.TextCache | None, prompts: list[str],
                 prompt_of_image: torch.Tensor, par: parallel.Parallel, device: torch.device, autocast,
                 gen: torch.Generator, dry_run: bool) -> None:
        self.cfg, self.base, self.examples, self.latents, self.texts = cfg, base, examples, latents, texts
        self.par, self.device, self.autocast, self.gen = par, device, autocast, gen
        self.latent_shape = cache.latent_shape(base, cfg.resolution)
        self.unet_forward = parallel.wrap(base.unet, par, device)
        if cfg.compile_unet and not dry_run:  # the training call only: sampling stays eager
            self.unet_forward = torch.compile(self.unet_forward, dynamic=False)
        trained_te = "text_encoder" in cfg.targets
        self.te_forward = [parallel.wrap(te, par, device) if trained_te else te for te in base.text_encoders]
        self.prompt_of_image = prompt_of_image.to(device)
        self.tokens = None if texts else [tokenize(tok, prompts, device) for tok in base.tokenizers]
        self.time_ids = size_ids(cfg.resolution, 1, device) if base.is_sdxl else None
        self.alphas_cumprod = base.noise_scheduler.alphas_cumprod.to(device)

    def unwrap(self) -> None:
        """Drop the DDP wrappers: the process group may then go (one destroyed after its group can hang)."""
        self.unet_forward, self.te_forward = self.base.unet, list(self.base.text_encoders)

    def _draw(self) -> tuple[torch.Tensor, ...]:
        """This step's randomness, drawn for the whole batch of every process (so that any number of
        processes takes the same steps), then this process's rows: image numbers, the VAE's standard
        normal sample, the noise and the timesteps (all on the CPU)."""
        cfg, gen = self.cfg, self.gen
        images = self.examples.draw(cfg.batch_size * self.par.world, gen)
        shape = (len(images), *self.latent_shape)
        eps = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(*shape[:2], 1, 1, generator=gen)
        t = torch.randint(0, self.base.noise_scheduler.config.num_train_timesteps, (len(images),), generator=gen)
        rows = self.par.rows(cfg.batch_size, self.examples.klass is not None)
        return images[rows], eps[rows], noise[rows], t[rows]

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # from pinned memory: the host does not wait for the copy
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def _conditioning(self, images: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        prompts = self.prompt_of_image[images]
        time_ids = None if self.time_ids is None else self.time_ids.expand(len(images), -1)
        if self.texts is not None:
            states, pooled = self.texts.lookup(prompts)
            return states, None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
        return encode_tokens(self.base, [table[prompts] for table in self.tokens], time_ids, self.te_forward)

    def loss(self) -> torch.Tensor:
        cfg, base = self.cfg, self.base
        chosen, eps, noise, t = self._draw()
        images, eps, noise, t = (self._to_device(x) for x in (chosen, eps, noise, t))
        sched, n_inst = base.noise_scheduler, cfg.batch_size
        with self.autocast:
            if self.latents is not None:
                raw = self.latents.sample(images, eps)
            else:
                with torch.no_grad():
                    pixels = self._to_device(self.examples.pixels(chosen))
                    dist = base.vae.encode(pixels.to(base.vae.dtype)).latent_dist
                    raw = dist.mean.float() + dist.std.float() * eps
            latents = raw * base.vae.config.scaling_factor
            noisy = sched.add_noise(latents, noise, t)
            if cfg.channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            states, cond = self._conditioning(images)
            pred = self.unet_forward(noisy, t, states, added_cond_kwargs=cond).sample.float()
        v_pred = sched.config.prediction_type == "v_prediction"
        target = sched.get_velocity(latents, noise, t) if v_pred else noise
        per = F.mse_loss(pred[:, : target.shape[1]], target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma:
            acp = self.alphas_cumprod[t]
            snr = acp / (1 - acp)
            per = per * snr.clamp(max=cfg.snr_gamma) / (snr + 1 if v_pred else snr)
        loss = per[:n_inst].mean()
        if n_inst < len(per):
            loss = loss + cfg.prior_loss_weight * per[n_inst:].mean()
        if "vae" in cfg.targets:
            pixels = self._to_device(self.examples.pixels(chosen[:n_inst]))
            with self.autocast:
                rec = base.vae.decode(raw[:n_inst].to(base.vae.dtype)).sample.float()
            loss = loss + F.mse_loss(rec, pixels.float())
        return loss
