"""What a run computes once instead of every step: VAE latents and text-encoder outputs.

The training images never change (no random crops or flips), so the frozen VAE encoder gives each image
the same latent distribution at every step. :class:`LatentCache` keeps each image's mean and standard
deviation (fp32, on the training device) and draws a fresh latent from them at each step, as encoding
would. The same holds for the text encoders while they are frozen (no text-encoder adapter, no new
tokens): :class:`TextCache` keeps each distinct prompt's hidden states (and SDXL's pooled embedding).

With both caches the VAE and the text encoders leave the GPU for the rest of the run (they come back for
sampling): the training step runs the UNet alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from loratool.train.model import BaseModel, encode_tokens


@dataclass
class LatentCache:
    mean: torch.Tensor  # [images, C, h, w]
    std: torch.Tensor

    def sample(self, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Latents of image numbers (on the cache's device) from standard normal ``eps``."""
        return self.mean[images] + self.std[images] * eps

    @property
    def nbytes(self) -> int:
        return self.mean.nbytes + self.std.nbytes


@dataclass
class TextCache:
    states: torch.Tensor  # [prompts, tokens, width]
    pooled: torch.Tensor | None  # SDXL: [prompts, width_2]

    def lookup(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.states[prompts], None if self.pooled is None else self.pooled[prompts]

    @property
    def nbytes(self) -> int:
        return self.states.nbytes + (0 if self.pooled is None else self.pooled.nbytes)


@contextmanager
def placed(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Have ``modules`` on ``device`` inside the block, each back where it was after it."""
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes, strict=True):
            m.to(home)


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor, device: torch.device) -> LatentCache:
    """Each image's latent distribution, as many images at a time as make 512² pixels (one at 512² and up)."""
    chunk = max(1, 2**18 // (pixels.shape[-1] * pixels.shape[-2]))
    means, stds = [], []
    for start in range(0, len(pixels), chunk):
        dist = vae.encode(pixels[start: start + chunk].to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return LatentCache(torch.cat(means), torch.cat(stds))


@torch.no_grad()
def encode_texts(base: BaseModel, tokens: list[torch.Tensor], autocast=None) -> TextCache:
    """Each prompt's conditioning from its token ids (one row a prompt, on the encoders' device)."""
    with autocast or nullcontext():
        states, cond = encode_tokens(base, tokens)
    return TextCache(states.float(), None if cond is None else cond["text_embeds"].float())


def latent_shape(base: BaseModel, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) of one image's latents."""
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    return int(base.vae.config.latent_channels), resolution // factor, resolution // factor
