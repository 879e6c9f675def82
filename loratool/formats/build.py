"""From role -> tensor groups (one per module) to canonical module objects, and back.

This is the one place that knows which roles make a LoRA, a LoHa, a LoKr, a full diff or a norm
module, and how DoRA magnitudes are laid out (LyCORIS ``dora_scale`` with explicit singleton dims,
peft ``lora_magnitude_vector`` 1-D for linear layers and ``(1, out, 1, 1)`` for convs). Tensors
are passed through untouched (reshapes are views of the same memory), so a read followed by a
write of the same layout is bit-identical.
"""

from __future__ import annotations

import math

import torch

from loratool.core.consistency import check_consistent
from loratool.core.modules import (
    Dora,
    FullModule,
    LohaModule,
    LokrModule,
    LoraModule,
    Module,
    NormModule,
)
from loratool.errors import LoraToolError

Group = dict[str, torch.Tensor]


class GroupError(ValueError):
    """A module's tensors that do not form any known adapter kind (the keys go to ``unknown``)."""


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Rows ``[a, b]`` -> ``[b, a]`` (exact; an involution): a modulation whose single-file weight holds
    ``[shift, scale]`` where diffusers holds ``[scale, shift]`` (the family's table says which)."""
    if t.is_meta:  # an outline (a streamed file's room) has shapes only; cat or empty_like there would build
        return torch.empty(t.shape, dtype=t.dtype, device="meta")  # torch's Python meta kernels (1.7 s)
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def alpha_value(t: torch.Tensor) -> float:
    """A stored alpha: one finite number (a tensor of shape [] or [1])."""
    if t.numel() != 1:
        raise GroupError(f"alpha of shape {list(t.shape)} holds {t.numel()} values, not one")
    value = float(t.item())
    if not math.isfinite(value):
        raise GroupError(f"alpha is {value}, not a finite number")
    return value


def _dora(group: Group, shape: tuple[int, ...]) -> Dora | None:
    if "dora_scale" in group:
        return dora_from_lycoris(group["dora_scale"], shape)
    if "magnitude" in group:
        return dora_from_peft(group["magnitude"], shape)
    return None


def dora_from_lycoris(t: torch.Tensor, shape: tuple[int, ...]) -> Dora:
    """LyCORIS/OneTrainer ``dora_scale``: ``(out, 1, ..)`` = output axis, ``(1, in, ..)`` = input axis."""
    out, inp = shape[0], shape[1]
    nd = len(shape)
    if t.dim() >= 2 and t.shape[0] == out and all(s == 1 for s in t.shape[1:]) and out != 1:
        return Dora(t.reshape(out, *([1] * (nd - 1))), "out")
    if t.dim() >= 2 and t.shape[1] == inp and t.shape[0] == 1 and all(s == 1 for s in t.shape[2:]):
        return Dora(t.reshape(1, inp, *([1] * (nd - 2))), "in")
    if t.dim() == 1 and t.shape[0] == out:  # 1-D, as diffusers' exporter leaves it: peft's output axis
        return Dora(t.reshape(out, *([1] * (nd - 1))), "out")
    raise GroupError(f"dora_scale of shape {tuple(t.shape)} fits neither axis of a {shape} weight")


def dora_from_peft(t: torch.Tensor, shape: tuple[int, ...]) -> Dora:
    """peft ``lora_magnitude_vector``: the output axis, 1-D (linear) or ``(1, out, 1, 1)`` (conv)."""
    out = shape[0]
    if t.numel() != out:
        raise GroupError(f"lora_magnitude_vector of shape {tuple(t.shape)} does not match {out} output rows")
    return Dora(t.reshape(out, *([1] * (len(shape) - 1))), "out")


def peft_magnitude(module: Module) -> torch.Tensor:
    """The DoRA magnitude as peft stores it; refuses the input axis, which peft cannot express."""
    dora = module.dora
    assert dora is not None
    if dora.axis != "out":
        raise LoraToolError(f"{module.key}: DoRA magnitude is on the input axis (old LyCORIS/A1111); "
                            "peft/diffusers lora_magnitude_vector holds the output axis only")
    if module.is_conv:
        return dora.magnitude.reshape(1, -1, 1, 1)
    return dora.magnitude.reshape(-1)


def _lora(group: Group, alpha: float | None, shape_hint: tuple[int, ...] | None) -> LoraModule:
    down, up = group["down"], group["up"]
    mid = group.get("mid")
    if mid is None and up.dim() == 2 and down.dim() == 4 and down.shape[2:] == (1, 1) and up.shape[1] == down.shape[0]:
        up = up.reshape(*up.shape, 1, 1)  # 1x1 conv stored with a flat up
    try:
        module = LoraModule("", "", alpha=alpha, down=down, up=up, mid=mid)
    except ValueError as e:
        raise GroupError(str(e).lstrip(". :")) from None
    shape = module.weight_shape
    module.dora = _dora(group, shape)
    if "bias" in group:
        module.bias = group["bias"]
    elif "diff_b" in group:
        module.bias = group["diff_b"] if module.scale == 1.0 else (
            group["diff_b"].double() / module.scale).to(group["diff_b"].dtype)
    return module


def _loha(group: Group, alpha: float | None, shape_hint: tuple[int, ...] | None) -> LohaModule:
    need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if any(k not in group for k in need):
        raise GroupError("LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
    module = LohaModule("", "", alpha=alpha, w1a=group["hada_w1_a"], w1b=group["hada_w1_b"],
                        w2a=group["hada_w2_a"], w2b=group["hada_w2_b"], t1=group.get("hada_t1"),
                        t2=group.get("hada_t2"), shape=tuple(shape_hint or ()))
    module.dora = _dora(group, module.weight_shape) if ("dora_scale" in group) else None
    return module


def _lokr(group: Group, alpha: float | None, shape_hint: tuple[int, ...] | None) -> LokrModule:
    try:
        module = LokrModule("", "", alpha=alpha, w1=group.get("lokr_w1"), w1a=group.get("lokr_w1_a"),
                            w1b=group.get("lokr_w1_b"), w2=group.get("lokr_w2"), w2a=group.get("lokr_w2_a"),
                            w2b=group.get("lokr_w2_b"), t2=group.get("lokr_t2"), shape=tuple(shape_hint or ()))
    except ValueError as e:
        raise GroupError(str(e).lstrip(". :")) from None
    module.dora = _dora(group, module.weight_shape) if ("dora_scale" in group) else None
    return module


def build_module(component: str, path: str, group: Group, shape_hint: tuple[int, ...] | None = None) -> Module:
    """The module these role -> tensor pairs describe (``GroupError`` when they describe none, or one
    that cannot make a ΔW: :func:`loratool.core.consistency.check_consistent`)."""
    try:
        module = _build(group, shape_hint)
    except (RuntimeError, IndexError) as e:  # shapes that no kind's math accepts
        raise GroupError(f"its tensors do not fit together ({' '.join(str(e).split())[:200]})") from None
    module.component, module.path = component, path
    try:
        check_consistent(module)
    except ValueError as e:
        raise GroupError(str(e)) from None
    return module


def _build(group: Group, shape_hint: tuple[int, ...] | None) -> Module:
    alpha = alpha_value(group["alpha"]) if "alpha" in group else None
    roles = set(group)
    if "down" in roles or "up" in roles:
        if not {"down", "up"} <= roles:
            raise GroupError(f"has lora_{'down' if 'down' in roles else 'up'} without its partner")
        module: Module = _lora(group, alpha, shape_hint)
    elif any(r.startswith("hada_") for r in roles):
        module = _loha(group, alpha, shape_hint)
    elif any(r.startswith("lokr_") for r in roles):
        module = _lokr(group, alpha, shape_hint)
    elif "diff" in roles:
        module = FullModule("", "", diff=group["diff"], bias=group.get("diff_b"))
    elif "w_norm" in roles:
        module = NormModule("", "", w_norm=group["w_norm"], bias=group.get("b_norm"))
    else:
        raise GroupError(f"only {', '.join(sorted(roles))}: no weights to apply")
    return module


def lycoris_group(module: Module) -> Group:
    """The role -> tensor pairs of a module in kohya/LyCORIS spelling (alpha excluded)."""
    if isinstance(module, LoraModule):
        g: Group = {"down": module.down, "up": module.up}
        if module.mid is not None:
            g["mid"] = module.mid
    elif isinstance(module, LohaModule):
        g = {"hada_w1_a": module.w1a, "hada_w1_b": module.w1b, "hada_w2_a": module.w2a, "hada_w2_b": module.w2b}
        if module.t1 is not None:
            g.update(hada_t1=module.t1, hada_t2=module.t2)
    elif isinstance(module, LokrModule):
        parts = {"lokr_w1": module.w1, "lokr_w1_a": module.w1a, "lokr_w1_b": module.w1b, "lokr_w2": module.w2,
                 "lokr_w2_a": module.w2a, "lokr_w2_b": module.w2b, "lokr_t2": module.t2}
        g = {k: v for k, v in parts.items() if v is not None}
    elif isinstance(module, FullModule):
        g = {"diff": module.diff}
        if module.bias is not None:
            g["diff_b"] = module.bias
        return g
    elif isinstance(module, NormModule):
        g = {"w_norm": module.w_norm}
        if module.bias is not None:
            g["b_norm"] = module.bias
        return g
    else:  # pragma: no cover - the Module union is closed
        raise LoraToolError(f"{module.key}: unknown module kind {type(module).__name__}")
    if module.dora is not None:
        g["dora_scale"] = module.dora.magnitude
    if isinstance(module, LoraModule) and module.bias is not None:
        g["diff_b"] = lora_bias_as_diff(module)
    return g


def lora_bias_as_diff(module: LoraModule) -> torch.Tensor:
    """A LoRA's bias change as an unscaled ``diff_b`` (peft's bias is scaled like ΔW)."""
    assert module.bias is not None
    if module.scale == 1.0:
        return module.bias
    return (module.bias.double() * module.scale).to(module.bias.dtype)
