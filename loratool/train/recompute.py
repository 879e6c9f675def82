"""What the backward pass recomputes instead of keeping: whole blocks (``--gradient-checkpointing``) or the
UNet's cheap element-wise steps (``--recompute-pointwise``), both through torch's non-reentrant checkpoint.

Under an adapter the UNet's frozen convolutions and projections keep little for the backward pass; most of
what a step holds is the output of element-wise steps: each ResNet block's GroupNorm (kept by the SiLU after
it) and each feed-forward's GEGLU product. Wrapping GroupNorm+SiLU, and the GEGLU after its projection, in
``torch.utils.checkpoint`` keeps only their inputs: bench/train/saved_activations.py measured 0.81× the
activations of the SD1.5 UNet at 512² (0.93× for the norms, 0.88× for the GEGLUs). The price is one
GroupNorm, SiLU and GELU more per block in the backward pass. Full gradient checkpointing
(``--gradient-checkpointing``) recomputes whole blocks and makes this moot.

Only blocks of the shape patched here are changed (a ResNet block without up/down sampling and with the
default time embedding, diffusers' GEGLU); the outputs are the same as without it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

KINDS = ("resnet", "geglu")  # what --recompute-pointwise patches: GroupNorm+SiLU of ResNet blocks, GEGLUs


def enable(cfg, base, emulated_autocast=None) -> None:
    """Gradient checkpointing of every block (and of the trained text encoders), else, when asked, the
    pointwise recomputation. ``emulated_autocast``: a dry run's (loratool.train.trace), under which the
    recomputation in the backward pass runs too, as CUDA's autocast state is restored for it."""
    kwargs: dict = {"use_reentrant": False}
    if emulated_autocast is not None and not isinstance(emulated_autocast, nullcontext):
        dtype = emulated_autocast.dtype
        kwargs["context_fn"] = lambda: (nullcontext(), type(emulated_autocast)(dtype))
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing(
            lambda module, *args: checkpoint(module.__call__, *args, **kwargs))
        if "text_encoder" in cfg.targets:
            for te in base.text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif cfg.recompute_pointwise:
        recompute_pointwise(base.unet, kwargs)


def _norm_act(norm, act, h: torch.Tensor) -> torch.Tensor:
    return act(norm(h))


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for its plain form, GroupNorm+SiLU recomputed."""
    ckpt = self._loratool_checkpoint
    h = ckpt(_norm_act, self.norm1, self.nonlinearity, input_tensor)
    h = self.conv1(h)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:
        h = h + temb
    h = ckpt(_norm_act, self.norm2, self.nonlinearity, h)
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def _geglu_tail(gelu, h: torch.Tensor) -> torch.Tensor:
    h, gate = h.chunk(2, dim=-1)
    return h * gelu(gate)


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' GEGLU.forward, the product recomputed (the projection, which an adapter may wrap, is not)."""
    return self._loratool_checkpoint(_geglu_tail, self.gelu, self.proj(hidden_states))


def recompute_pointwise(unet: torch.nn.Module, checkpoint_kwargs: dict, kinds: tuple[str, ...] = KINDS) -> int:
    """Patch ``unet``'s plain ResNet blocks and GEGLUs (those of ``kinds``) in place; returns how many modules
    were patched."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.resnet import ResnetBlock2D

    def ckpt(fn: Callable, *args):
        return checkpoint(fn, *args, **checkpoint_kwargs)

    patched = 0
    for m in unet.modules():
        if "resnet" in kinds and isinstance(m, ResnetBlock2D) and m.upsample is None and m.downsample is None \
                and m.time_embedding_norm == "default":
            m.forward = types.MethodType(_resnet_forward, m)
        elif "geglu" in kinds and isinstance(m, GEGLU):
            m.forward = types.MethodType(_geglu_forward, m)
        else:
            continue
        m._loratool_checkpoint = ckpt
        patched += 1
    return patched
