"""Tiny diffusers/transformers models with the real SD1/SDXL block structure, random canonical
adapters over their layers, and the loaders of diffusers and peft run with their warnings captured.

Nothing here touches a hub: every model is built from a config with random weights (fixed seeds).
Shared by the convert tests (imported by module name; pytest puts this folder on sys.path).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import torch

from loratool.core.modules import Adapter, LoraModule

SD1_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# SDXL's real layout (block types, transformer depth 1/2/10, linear projections, text_time
# embedding) at tiny widths, so that SAI block names line up with the real model's
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    attention_head_dim=(2, 4, 4), norm_num_groups=32, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
)
CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
            max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)


@cache
def _base(kind: str) -> torch.nn.Module:
    torch.manual_seed({"sd1": 1, "sdxl": 2, "te": 3, "te2": 4}[kind])
    if kind in ("sd1", "sdxl"):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**(SD1_UNET if kind == "sd1" else SDXL_UNET)).eval()
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**CLIP)
    return (CLIPTextModel(cfg) if kind == "te" else CLIPTextModelWithProjection(cfg)).eval()


def model(kind: str) -> torch.nn.Module:
    """A fresh copy of a tiny model: ``sd1``/``sdxl`` UNet, ``te`` (CLIP-L-like), ``te2`` (with projection)."""
    return copy.deepcopy(_base(kind))


def layers(m: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d of a model by its path, CLIP paths spelt with ``text_model.``."""
    out = {}
    flat_clip = not hasattr(m, "text_model") and hasattr(m, "encoder") and hasattr(m, "embeddings")
    for name, mod in m.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            out[("text_model." + name) if flat_clip else name] = mod
    return out


def lora_for(component: str, path: str, weight: torch.Tensor, rank: int, alpha: float | None,
             gen: torch.Generator, dtype: torch.dtype = torch.float32) -> LoraModule:
    """A random LoRA (kohya factor shapes) for one layer weight; both factors non-zero."""
    out_f, in_f = weight.shape[0], weight.shape[1]
    if weight.dim() == 4:
        down = torch.randn(rank, in_f, *weight.shape[2:], generator=gen)
        up = torch.randn(out_f, rank, 1, 1, generator=gen)
    else:
        down = torch.randn(rank, in_f, generator=gen)
        up = torch.randn(out_f, rank, generator=gen)
    norm = (down.numel() / rank) ** 0.5
    return LoraModule(component, path, alpha=alpha, down=(down / norm).to(dtype), up=(up * 0.1).to(dtype))


def random_adapter(parts: dict[str, torch.nn.Module], select: Callable[[str, str], bool], *, seed: int = 0,
                   rank: Callable[[str, str], int] | int = 4,
                   alpha: Callable[[str, str], float | None] | float | None = 2.0,
                   base_model: str = "sd1") -> Adapter:
    """A canonical adapter over the layers of ``parts`` (component -> model) that ``select(comp, path)``."""
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(base_model=base_model, source_format="test")
    for comp, m in parts.items():
        for path, layer in layers(m).items():
            if not select(comp, path):
                continue
            r = rank(comp, path) if callable(rank) else rank
            a = alpha(comp, path) if callable(alpha) else alpha
            adapter.add(lora_for(comp, path, layer.weight, r, a, gen))
    return adapter


# ------------------------------------------------------------------------------ loader capture

class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def captured() -> Iterator[list[str]]:
    """Every warning diffusers, peft and transformers log or ``warnings.warn`` while inside."""
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.messages.extend(f"warning: {w.message}" for w in caught)


def problems(messages: list[str]) -> list[str]:
    """The captured messages that say a LoRA key was not used or a value was ignored.

    transformers 5 also logs a "LOAD REPORT" listing every *base* parameter as MISSING when a LoRA
    state dict (which has no base weights) is loaded into a text encoder; rows of that kind are not
    problems. Any other row (UNEXPECTED, or a LoRA parameter MISSING) is.
    """
    out = []
    for msg in messages:
        if "deprecated" in msg:  # library deprecation notices say nothing about the adapter
            continue
        if "LOAD REPORT" not in msg:
            out.append(msg)
            continue
        for row in msg.splitlines():
            cells = [c.strip() for c in row.split("|")]
            if len(cells) >= 2 and cells[1] and cells[1] != "Status" and not set(cells[0]) <= {"-"}:
                if cells[1] != "MISSING" or "lora" in cells[0].lower():
                    out.append(f"{cells[0]}: {cells[1]}")
    return out


def lora_layers(m: torch.nn.Module) -> set[str]:
    """Paths (``text_model.`` spelling for CLIP) of the layers peft wrapped with a LoRA."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    flat_clip = not hasattr(m, "text_model") and hasattr(m, "encoder") and hasattr(m, "embeddings")
    names = {n for n, mod in m.named_modules() if isinstance(mod, BaseTunerLayer)}
    return {("text_model." + n) if flat_clip else n for n in names}


def merge_all(m: torch.nn.Module) -> None:
    """Fuse every LoRA into its base weight, as ``fuse_lora`` does (peft ``merge``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for mod in m.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()


def fused_errors(m: torch.nn.Module, base: torch.nn.Module, adapter: Adapter, component: str) -> dict[str, float]:
    """Relative error of ``fused W − W0`` against each module's ΔW (fp32, float64 comparison)."""
    now = {p: layer for p, layer in _weights(m).items()}
    before = _weights(base)
    out = {}
    for mod in adapter.modules.values():
        if mod.component != component:
            continue
        got = now[mod.path].double() - before[mod.path].double()
        want = mod.delta(torch.float64)
        out[mod.path] = float((got - want).norm() / want.norm())
    return out


def _weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    flat_clip = not hasattr(m, "text_model") and hasattr(m, "encoder") and hasattr(m, "embeddings")
    out = {}
    for name, mod in m.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            name = name.removesuffix(".base_layer")
            out[("text_model." + name) if flat_clip else name] = w.detach()
    return out


def load_diffusers(path, unet: torch.nn.Module | None, te: torch.nn.Module | None = None,
                   te2: torch.nn.Module | None = None, *, sdxl: bool = False) -> list[str]:
    """What a pipeline's ``load_lora_weights(file)`` does, on bare models: diffusers' own
    ``lora_state_dict`` then ``load_lora_into_unet`` / ``load_lora_into_text_encoder``.
    Returns every warning logged on the way (an unmatched key is one of them)."""
    from pathlib import Path

    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    loader = StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin
    path = Path(path)
    extra = {"unet_config": unet.config} if sdxl and unet is not None else {}
    with captured() as messages:
        state, alphas, meta = loader.lora_state_dict(str(path.parent), weight_name=path.name,
                                                     return_lora_metadata=True, **extra)
        bad = [k for k in state if "lora" not in k]
        if bad:
            raise ValueError(f"Invalid LoRA checkpoint (as load_lora_weights says): {bad[:3]}")
        if unet is not None:
            loader.load_lora_into_unet(state, alphas, unet, adapter_name="t", metadata=meta)
        if te is not None:
            loader.load_lora_into_text_encoder(state, alphas, te, prefix="text_encoder", adapter_name="t",
                                               metadata=meta)
        if te2 is not None:
            loader.load_lora_into_text_encoder(state, alphas, te2, prefix="text_encoder_2", adapter_name="t",
                                               metadata=meta)
    return messages
