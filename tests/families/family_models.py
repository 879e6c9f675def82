"""Tiny random transformers of each new family, built with diffusers' own model classes, random adapters over
their Linear layers, and diffusers' own LoRA loading path (``<Mixin>.lora_state_dict`` then
``load_lora_into_transformer``) with its warnings captured. Nothing touches a hub. Shared by the family tests
(imported by module name; pytest puts this folder on sys.path).
"""

from __future__ import annotations

import copy
import inspect
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "formats"))
import convert_models as cm  # noqa: E402

from loratool.arch import family  # noqa: E402
from loratool.core.modules import Adapter  # noqa: E402
from loratool.linalg.factored import product_sq_norm  # noqa: E402

# diffusers class and keyword arguments of a tiny model of each family (every block kind present, widths small)
TINY: dict[str, tuple[str, dict]] = {
    "wan": ("WanTransformer3DModel", dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                          text_dim=24, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)),
    "wan-i2v": ("WanTransformer3DModel", dict(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, text_dim=24, freq_dim=16, ffn_dim=32, num_layers=2,
                                              image_dim=12, added_kv_proj_dim=16, rope_max_seq_len=32)),
    "hunyuan-video": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(2, 2, 4))),
    "qwen-image": ("QwenImageTransformer2DModel", dict(in_channels=16, out_channels=4, num_layers=2,
                                                       attention_head_dim=8, num_attention_heads=2,
                                                       joint_attention_dim=24, axes_dims_rope=(2, 2, 4))),
    "z-image": ("ZImageTransformer2DModel", dict(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
                                                 n_kv_heads=2, cap_feat_dim=24, axes_dims=[4, 6, 6],
                                                 axes_lens=[32, 32, 32])),
    "lumina2": ("Lumina2Transformer2DModel", dict(sample_size=8, in_channels=4, hidden_size=48, num_layers=2,
                                                  num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1,
                                                  multiple_of=16, cap_feat_dim=24, axes_dim_rope=(4, 6, 6),
                                                  axes_lens=(32, 32, 32))),
    "chroma": ("ChromaTransformer2DModel", dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                                num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(2, 2, 4),
                                                approximator_num_channels=8, approximator_hidden_dim=32,
                                                approximator_layers=2)),
    "flux-kontext": ("FluxTransformer2DModel", dict(in_channels=16, num_layers=2, num_single_layers=2,
                                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                                    pooled_projection_dim=12, guidance_embeds=True,
                                                    axes_dims_rope=(2, 2, 4))),
    "hidream": ("HiDreamImageTransformer2DModel", dict(patch_size=2, in_channels=4, num_layers=1, num_single_layers=1,
                                                       attention_head_dim=8, num_attention_heads=2,
                                                       caption_channels=[24, 24], text_emb_dim=12,
                                                       num_routed_experts=4, num_activated_experts=2,
                                                       axes_dims_rope=(4, 4), max_resolution=(16, 16),
                                                       llama_layers=[0, 1])),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                          caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
                                          pos_embed_max_size=8, dual_attention_layers=(0, 1), qk_norm="rms_norm")),
    "ltx-video": ("LTXVideoTransformer3DModel", dict(in_channels=8, out_channels=8, num_attention_heads=2,
                                                     attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                                                     caption_channels=24)),
}
FAMILY = {"wan-i2v": "wan"}  # model name -> family, where they differ
MIXIN = {"wan": "WanLoraLoaderMixin", "hunyuan-video": "HunyuanVideoLoraLoaderMixin",
         "qwen-image": "QwenImageLoraLoaderMixin", "z-image": "ZImageLoraLoaderMixin",
         "lumina2": "Lumina2LoraLoaderMixin", "chroma": "FluxLoraLoaderMixin", "flux-kontext": "FluxLoraLoaderMixin",
         "hidream": "HiDreamImageLoraLoaderMixin", "sd3": "SD3LoraLoaderMixin", "ltx-video": "LTXVideoLoraLoaderMixin"}


@cache
def _base(name: str) -> torch.nn.Module:
    import diffusers

    cls, kwargs = TINY[name]
    torch.manual_seed(sorted(TINY).index(name) + 1)
    return getattr(diffusers, cls)(**kwargs).eval()


def model(name: str) -> torch.nn.Module:
    """A fresh copy of the tiny model of ``name`` (a family, or ``wan-i2v``)."""
    return copy.deepcopy(_base(name))


def linears(m: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(x.weight.shape) for n, x in m.named_modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))}


def adapter(name: str, select: Callable[[str], bool] = lambda p: True, *, seed: int = 0,
            alpha: Callable[[str], float | None] | float | None = None) -> Adapter:
    """A random LoRA over the model's Linear layers that ``select(path)``, ranks 2 and 3, alphas that differ
    between modules (the scale matters), as the family's canonical adapter."""
    base = _base(name)
    fam = FAMILY.get(name, name)

    def alpha_of(path: str) -> float | None:
        if callable(alpha):
            return alpha(path)
        return alpha if alpha is not None else float(1 + sum(map(ord, path)) % 5)

    a = cm.random_adapter({"transformer": base}, lambda c, p: select(p) and isinstance(
        base.get_submodule(p), torch.nn.Linear), seed=seed, rank=lambda c, p: 2 + len(p) % 2,
        alpha=lambda c, p: alpha_of(p), base_model=fam)
    return a


def load(name: str, path: Path, m: torch.nn.Module) -> list[str]:
    """What ``pipeline.load_lora_weights(file)`` does for the family, on the bare transformer: the family's
    loader mixin's ``lora_state_dict`` (its converters run here) and ``load_lora_into_transformer``."""
    import diffusers.loaders.lora_pipeline as lp

    mixin = getattr(lp, MIXIN[FAMILY.get(name, name)])
    kwargs = {"return_lora_metadata": True}
    if "return_alphas" in inspect.signature(mixin.lora_state_dict).parameters or mixin.__name__.startswith("Flux"):
        kwargs["return_alphas"] = True
    with cm.captured() as messages:
        out = mixin.lora_state_dict(str(path.parent), weight_name=path.name, **kwargs)
        state, alphas, meta = out if len(out) == 3 else (out[0], None, out[1])
        bad = [k for k in state if "lora" not in k]
        if bad:
            raise ValueError(f"Invalid LoRA checkpoint (as load_lora_weights says): {bad[:3]}")
        params = inspect.signature(mixin.load_lora_into_transformer).parameters
        extra = {"network_alphas": alphas} if "network_alphas" in params else {}
        mixin.load_lora_into_transformer(state, transformer=m, adapter_name="t", metadata=meta, **extra)
    return messages


def check_loaded(messages: list[str], m: torch.nn.Module, base: torch.nn.Module, a: Adapter) -> float:
    """No loader complaint, a LoRA on exactly the adapter's modules, and fused weight = base + our ΔW: the
    largest relative error."""
    assert cm.problems(messages) == [], cm.problems(messages)
    want = {mod.path for mod in a.modules.values()}
    assert cm.lora_layers(m) == want, sorted(cm.lora_layers(m) ^ want)[:6]
    cm.merge_all(m)
    errors = cm.fused_errors(m, base, a, "transformer")
    assert len(errors) == len(want)
    return max(errors.values())


def pattern(*names: str) -> Callable[[str], bool]:
    rx = re.compile("|".join(names))
    return lambda p: bool(rx.search(p))


# ------------------------------------------------------------------ ΔW compared on the factors

def cloned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a diffusers converter gets: its own tensors (Wan's scales some of its input in place)."""
    return {k: v.clone() for k, v in tensors.items()}


def factors(adapter, fam_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ΔW per diffusers module of what we read, as factors (up·scale, down); fused modules cut into their parts
    (a Flux linear1 ΔW is never built densely)."""
    fam = family(fam_name)
    out = {}
    for key, m in adapter.modules.items():
        up, down = m.up.double() * m.scale, m.down.double()
        for part, (r0, r1) in fam.fused.get(key, [(key, (0, up.shape[0]))]):
            out[part.removeprefix("transformer.")] = (up[r0:r1], down)
    return out


def oracle(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors (B, A) per module a diffusers converter returned (alpha folded in)."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            out[key.removeprefix("transformer.").removesuffix(".lora_A.weight")] = \
                (state[key.replace(".lora_A.", ".lora_B.")].double(), down.double())
    return out


def same(ours: dict, theirs: dict) -> None:
    """The same modules with the same ΔW: ‖B₁A₁ − B₂A₂‖/‖B₂A₂‖ from the factors."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:6]
    for k, (up, down) in theirs.items():
        ou, od = ours[k]
        diff = product_sq_norm(torch.cat([ou, -up], 1), torch.cat([od, down], 0))
        assert diff <= 1e-12 * product_sq_norm(up, down), k
