"""Each new family's table, built from its rules at a real variant's sizes, is the Linear layers of diffusers' own
model class at that variant's config (every name, every shape), built on the meta device (no memory, no hub);
and checkpoints of each family, in diffusers and in single-file names, are detected with their variant."""

from __future__ import annotations

import pytest
import torch

from loratool.arch import detect_checkpoint, family, load_arch
from loratool.arch.rules import build_table

pytest.importorskip("diffusers")

# model class, config of a real checkpoint (diffusers' defaults where they are the released model's), our variant
REAL = {
    "wan-14b-i2v": ("WanTransformer3DModel", dict(image_dim=1280, added_kv_proj_dim=5120, in_channels=36), "wan", "14B-I2V",
                    {"I": 1}),
    "wan-1.3b": ("WanTransformer3DModel", dict(num_attention_heads=12, ffn_dim=8960, num_layers=30), "wan", "1.3B",
                 {"I": 0}),
    "wan-5b": ("WanTransformer3DModel", dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                                             out_channels=48), "wan", "5B", {"I": 0}),
    "hunyuan-video": ("HunyuanVideoTransformer3DModel", {}, "hunyuan-video", "13B", {}),
    "qwen-image": ("QwenImageTransformer2DModel", {}, "qwen-image", "20B", {}),
    "z-image": ("ZImageTransformer2DModel", {}, "z-image", "6B", {}),
    "lumina2": ("Lumina2Transformer2DModel", dict(cap_feat_dim=2304), "lumina2", "2B", {}),
    "chroma": ("ChromaTransformer2DModel", {}, "chroma", "8.9B", {}),
    "hidream": ("HiDreamImageTransformer2DModel", dict(patch_size=2, in_channels=16, caption_channels=[4096, 4096],
                                                       text_emb_dim=2048, llama_layers=list(range(48))), "hidream",
                "17B", {}),
    "sd3.5-large": ("SD3Transformer2DModel", dict(num_layers=38, attention_head_dim=64, num_attention_heads=38,
                                                  caption_projection_dim=2432, pos_embed_max_size=192,
                                                  qk_norm="rms_norm"), "sd3", "3.5-large", {}),
    "sd3.5-medium": ("SD3Transformer2DModel", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                                   pos_embed_max_size=384, qk_norm="rms_norm",
                                                   dual_attention_layers=tuple(range(13))), "sd3", "3.5-medium", {}),
    "ltx-video": ("LTXVideoTransformer3DModel", {}, "ltx-video", "2B", {}),
}


SINGLE_FILE_ONLY = {"wan": {"model.diffusion_model.head.modulation": (1, 2, 5120)},
                    "qwen-image": {"model.diffusion_model.txt_norm.weight": (3584,)}}


def _meta_model(name: str) -> torch.nn.Module:
    import diffusers

    cls, kwargs, *_ = REAL[name]
    with torch.device("meta"):
        return getattr(diffusers, cls)(**kwargs)


@pytest.mark.parametrize("name", sorted(REAL))
def test_table_is_diffusers_model(name):
    _, _, fam_name, variant, extra = REAL[name]
    fam = family(fam_name)
    table = fam.at({**fam.variant_sizes(variant), **extra}, variant)
    ours = {s.path: tuple(s.shape) for s in table.modules.values()
            if s.component == "transformer" and not s.is_fused and s.group != "norm"}
    theirs = {n: tuple(m.weight.shape) for n, m in _meta_model(name).named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(REAL))
def test_checkpoint_detected_with_its_variant(name):
    _, _, fam_name, variant, _ = REAL[name]
    state = {k: tuple(v.shape) for k, v in _meta_model(name).state_dict().items()}
    found = detect_checkpoint(state)  # diffusers names (a transformer folder)
    assert (found.family, found.variant) == (fam_name, variant)
    table = family(fam_name).at(dict(found.sizes)).table
    # the same weights in single-file names, as ComfyUI saves them, with the non-adaptable keys detection reads
    single = {key: table.checkpoint_shape(key) for key in table.checkpoint_params}
    single.update(SINGLE_FILE_ONLY.get(fam_name, {}))
    found = detect_checkpoint(single)
    assert (found.family, found.variant) == (fam_name, variant)


def test_flux_and_sd3_rules_reproduce_their_generated_tables():
    """SD3's transformer is rules now (3.5 Medium's attn2, 3.5 Large's depth): at SD3 Medium's sizes they give the
    generated table, module for module."""
    fam = family("sd3")
    fields = ("shape", "group", "block", "kohya", "checkpoint_key", "checkpoint_rows", "row_order", "fused_in", "parts")
    from loratool.arch.table import Arch

    ruled = Arch(build_table("sd3", fam.rules))
    table = load_arch("sd3")
    specs = [{k: tuple(getattr(s, f) for f in fields) for k, s in t.modules.items() if s.component == "transformer"}
             for t in (ruled, table)]
    assert specs[0] == specs[1]
    assert ruled.fused == table.fused and ruled.lbw == table.lbw
