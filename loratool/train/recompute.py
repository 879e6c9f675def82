"""What the backward pass recomputes instead of keeping: whole blocks (``--gradient-checkpointing``) or the
UNet's cheap element-wise steps (``--recompute-pointwise``): the first through torch's non-reentrant
checkpoint, the second through a lean autograd Function of its own (_Recomputed).

Under an adapter the UNet's frozen convolutions and projections keep little for the backward pass; most of
what a step holds is the output of element-wise steps: each ResNet block's GroupNorm (kept by the SiLU after
it) and each feed-forward's GEGLU product. Recomputing GroupNorm+SiLU, and the GEGLU after its projection,
in the backward pass keeps only their inputs: bench/train/saved_activations.py measured 0.81× the
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
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KINDS = ("resnet", "geglu")  # what --recompute-pointwise patches: GroupNorm+SiLU of ResNet blocks, GEGLUs


def enable(cfg, base, emulated_autocast=None) -> None:
    """Gradient checkpointing of every block (and of the trained text encoders), else, when asked, the
    pointwise recomputation. ``emulated_autocast``: a dry run's (loratool.train.trace), under which the
    recomputation in the backward pass runs too, as CUDA's autocast state is restored for it."""
    context_fn = None
    if emulated_autocast is not None and not isinstance(emulated_autocast, nullcontext):
        dtype = emulated_autocast.dtype
        context_fn = lambda: type(emulated_autocast)(dtype)  # noqa: E731
    if cfg.gradient_checkpointing:
        kwargs: dict = {"use_reentrant": False}
        if context_fn is not None:
            kwargs["context_fn"] = lambda: (nullcontext(), context_fn())
        base.unet.enable_gradient_checkpointing(
            lambda module, *args: checkpoint(module.__call__, *args, **kwargs))
        if "text_encoder" in cfg.targets:
            for te in base.text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif cfg.recompute_pointwise:
        recompute_pointwise(base.unet, context_fn)


class _Recomputed(torch.autograd.Function):
    """``fn(*tensors)`` keeping only ``tensors`` for the backward pass, which runs ``fn`` again under the
    autocast state of the forward. torch's checkpoint does the same with more bookkeeping per call (RNG
    states, saved-tensor hooks, ~0.25 ms of host time here), which adds up over the 60 small regions of a
    UNet; these regions draw no random numbers, so there is no RNG state to restore."""

    @staticmethod
    def forward(ctx, fn, context, *tensors):
        ctx.fn, ctx.context = fn, context
        ctx.save_for_backward(*tensors)
        return fn(*tensors)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:],
                                                                      strict=True)]
        with torch.enable_grad(), ctx.context():
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return None, None, *(next(grads) if t.requires_grad else None for t in inputs)


def _autocast_now(device_type: str) -> Callable:
    """A factory of the autocast context in force now, for the recomputation (which runs in autograd's
    backward thread, outside the forward's context)."""
    if not torch.is_autocast_enabled(device_type):
        return nullcontext
    dtype = torch.get_autocast_dtype(device_type)
    return lambda: torch.autocast(device_type, dtype=dtype)


def _norm_act(groups: int, eps: float, act, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    return act(F.group_norm(h, groups, weight, bias, eps))


def _recomputed_norm_act(ckpt, norm: torch.nn.GroupNorm, act, h: torch.Tensor) -> torch.Tensor:
    return ckpt(partial(_norm_act, norm.num_groups, norm.eps, act), h, norm.weight, norm.bias)


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for its plain form, GroupNorm+SiLU recomputed."""
    ckpt = self._loratool_checkpoint
    h = _recomputed_norm_act(ckpt, self.norm1, self.nonlinearity, input_tensor)
    h = self.conv1(h)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:
        h = h + temb
    h = _recomputed_norm_act(ckpt, self.norm2, self.nonlinearity, h)
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def _geglu_tail(gelu, h: torch.Tensor) -> torch.Tensor:
    h, gate = h.chunk(2, dim=-1)
    return h * gelu(gate)


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' GEGLU.forward, the product recomputed (the projection, which an adapter may wrap, is not)."""
    return self._loratool_checkpoint(partial(_geglu_tail, self.gelu), self.proj(hidden_states))


def recompute_pointwise(unet: torch.nn.Module, context_fn: Callable | None = None,
                        kinds: tuple[str, ...] = KINDS) -> int:
    """Patch ``unet``'s plain ResNet blocks and GEGLUs (those of ``kinds``) in place; returns how many modules
    were patched. ``context_fn`` makes the context the recomputation runs in (default: the autocast state of
    the forward pass)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.resnet import ResnetBlock2D

    def ckpt(fn: Callable, *args):
        if not torch.is_grad_enabled():
            return fn(*args)
        context = context_fn or _autocast_now(args[0].device.type)
        return _Recomputed.apply(fn, context, *args)

    patched = 0
    for m in unet.modules():
        if "resnet" in kinds and isinstance(m, ResnetBlock2D) and m.upsample is None and m.downsample is None \
                and m.time_embedding_norm == "default" and m.norm1.affine and m.norm2.affine:
            m.forward = types.MethodType(_resnet_forward, m)
        elif "geglu" in kinds and isinstance(m, GEGLU):
            m.forward = types.MethodType(_geglu_forward, m)
        else:
            continue
        m._loratool_checkpoint = ckpt
        patched += 1
    return patched
