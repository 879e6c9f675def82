"""Every layout x every family it applies to: an adapter converted to the layout, written, read back, is
reported in that layout and family, has the same ΔW per weight (exact: the scale folded in at most), and
written again gives the same names (one codec per layout, the same object both ways)."""

from __future__ import annotations

import math

import pytest
import torch

from loratool.arch import all_families, family
from loratool.core.modules import Adapter, LohaModule, LokrModule, LoraModule
from loratool.formats import read_adapter, write_adapter
from loratool.formats.layouts import ALL_KINDS, find_layout
from loratool.io.safetensors import SafetensorsFile
from loratool.linalg.factored import product_sq_norm as _lowrank_sq_norm
from loratool.linalg.structured import structured_factors
from loratool.ops.convert import convert

# a few modules of each family: attention (a fused one where the family has them), a conv, every text encoder,
# the final modulation whose single-file rows are swapped
PICKS = {
    "sd1": ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
            "unet.up_blocks.1.resnets.0.conv1", "unet.mid_block.attentions.0.proj_in",
            "text_encoder.text_model.encoder.layers.2.self_attn.q_proj",
            "text_encoder.text_model.encoder.layers.2.mlp.fc1"],
    "sd2": ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
            "unet.up_blocks.2.attentions.1.proj_out", "text_encoder.text_model.encoder.layers.20.self_attn.k_proj"],
    "sdxl": ["unet.down_blocks.2.attentions.1.transformer_blocks.7.attn2.to_k",
             "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "unet.down_blocks.0.resnets.1.conv2",
             "text_encoder.text_model.encoder.layers.11.self_attn.v_proj",
             "text_encoder_2.text_model.encoder.layers.30.self_attn.out_proj"],
    "flux": ["transformer.transformer_blocks.2.attn.to_qkv", "transformer.single_transformer_blocks.5.to_qkv_mlp",
             "transformer.transformer_blocks.0.attn.to_add_out", "transformer.norm_out.linear",
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
             "text_encoder_2.encoder.block.3.layer.1.DenseReluDense.wo"],
    "sd3": ["transformer.transformer_blocks.4.attn.to_added_qkv", "transformer.transformer_blocks.4.ff.net.2",
            "transformer.norm_out.linear", "text_encoder.text_model.encoder.layers.1.mlp.fc2",
            "text_encoder_3.encoder.block.0.layer.0.SelfAttention.k"],
    "chroma": ["transformer.transformer_blocks.1.attn.to_qkv", "transformer.single_transformer_blocks.3.to_qkv_mlp",
               "transformer.transformer_blocks.0.ff.net.2", "transformer.distilled_guidance_layer.layers.0.linear_1",
               "transformer.proj_out"],
    "flux-kontext": ["transformer.transformer_blocks.2.attn.to_qkv", "transformer.single_transformer_blocks.5.proj_out",
                     "transformer.norm_out.linear"],
    "hidream": ["transformer.double_stream_blocks.0.block.attn1.to_q", "transformer.double_stream_blocks.0.block.attn1.to_out_t",
                "transformer.single_stream_blocks.2.block.ff_i.experts.3.w2",
                "transformer.final_layer.adaLN_modulation.1", "transformer.caption_projection.5.linear"],
    "hunyuan-video": ["transformer.transformer_blocks.1.attn.to_qkv", "transformer.transformer_blocks.0.attn.to_added_qkv",
                      "transformer.single_transformer_blocks.2.to_qkv_mlp", "transformer.transformer_blocks.3.ff.net.0.proj",
                      "transformer.transformer_blocks.3.norm1.linear", "transformer.norm_out.linear",
                      "transformer.context_embedder.token_refiner.refiner_blocks.1.attn.to_qkv",
                      "transformer.time_text_embed.timestep_embedder.linear_1"],
    "ltx-video": ["transformer.transformer_blocks.3.attn1.to_q", "transformer.transformer_blocks.0.attn2.to_k",
                  "transformer.transformer_blocks.27.ff.net.2", "transformer.proj_in", "transformer.time_embed.linear"],
    "lumina2": ["transformer.layers.1.attn.to_qkv", "transformer.noise_refiner.0.norm1.linear",
                "transformer.context_refiner.1.feed_forward.linear_2", "transformer.norm_out.linear_1",
                "transformer.time_caption_embed.caption_embedder.1"],
    "qwen-image": ["transformer.transformer_blocks.3.attn.to_q", "transformer.transformer_blocks.3.attn.add_k_proj",
                   "transformer.transformer_blocks.59.img_mlp.net.2", "transformer.transformer_blocks.0.txt_mod.1",
                   "transformer.img_in", "transformer.norm_out.linear"],
    "wan": ["transformer.blocks.0.attn1.to_q", "transformer.blocks.5.attn2.add_k_proj",
            "transformer.blocks.39.ffn.net.0.proj", "transformer.condition_embedder.time_proj", "transformer.proj_out",
            "transformer.condition_embedder.image_embedder.ff.net.2"],
    "z-image": ["transformer.layers.2.attention.to_qkv", "transformer.noise_refiner.1.adaLN_modulation.0",
                "transformer.context_refiner.0.feed_forward.w3", "transformer.all_final_layer.2-1.linear",
                "transformer.all_x_embedder.2-1"],
    # names no family has (Wan's blocks.N.self_attn.q was one before Wan had an entry)
    "generic": [("transformer.stages.0.mixer.proj_in", (64, 48)), ("transformer.stages.3.mixer.out_proj", (48, 96)),
                ("text_encoder.text_model.encoder.layers.0.mlp.fc1", (32, 16))],
}
CASES = [(f.name, lay) for f in all_families(include_generic=True) for lay in f.layouts
         if find_layout(lay).writable and lay != "textual-inversion"]


def _adapter(fam_name: str, layout: str, seed: int = 0) -> Adapter:
    """Modules of ``fam_name`` that ``layout`` can hold: LoRA with an alpha (and a LoKr and a LoHa where the
    layout keeps LyCORIS kinds)."""
    spec = find_layout(layout)
    fam = family(fam_name)
    g = torch.Generator().manual_seed(seed)
    a = Adapter(base_model=fam_name if fam_name != "generic" else "unknown")
    picks = [(k, fam.shape(k)) for k in PICKS[fam_name]] if fam_name != "generic" else PICKS[fam_name]
    for i, (key, shape) in enumerate(picks):
        comp, _, path = key.partition(".")
        if not spec.holds_component(comp) or (spec.attention_only and not _attention(path)):
            continue
        r = 2 + i % 2
        down = torch.randn(r, *shape[1:], generator=g) * 0.1
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.1
        module = LoraModule(comp, path, alpha=float(r + i % 3), down=down, up=up)
        lycoris = spec.kinds == ALL_KINDS and len(shape) == 2 and key not in fam.fused  # a fused LoKr cannot split
        if lycoris and i == 1 and shape[0] % 4 == 0 and shape[1] % 2 == 0:
            module = LokrModule(comp, path, alpha=2.0, w1=torch.randn(4, 2, generator=g),
                                w2a=torch.randn(shape[0] // 4, 2, generator=g),
                                w2b=torch.randn(2, shape[1] // 2, generator=g) * 0.1)
        elif lycoris and i == 2 and "norm_out" not in path:
            module = LohaModule(comp, path, alpha=2.0, w1a=torch.randn(shape[0], 2, generator=g),
                                w1b=torch.randn(2, shape[1], generator=g) * 0.1,
                                w2a=torch.randn(shape[0], 2, generator=g),
                                w2b=torch.randn(2, shape[1], generator=g) * 0.1)
        a.add(module)
    assert a.modules, (fam_name, layout)
    return a


def _attention(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj", "out_proj") \
        or path.endswith("to_out.0")


def _parts(a: Adapter, fam_name: str, by_path: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact factors (up, down) of ΔW per weight, fused weights cut into their parts; ``by_path``: keyed without
    the component (a peft folder of a model no family knows does not say which component it adapted)."""
    fused = family(fam_name).fused
    out = {}
    for key, m in (((m.path, m) for m in a.modules.values()) if by_path else a.modules.items()):
        up, down = structured_factors(m)
        for part, (r0, r1) in fused.get(key, [(key, (0, up.shape[0]))]):
            out[part] = (up[r0:r1], down)
    return out


def _rel(want: tuple[torch.Tensor, torch.Tensor], got: tuple[torch.Tensor, torch.Tensor]) -> float:
    """‖ΔW' − ΔW‖/‖ΔW‖ on the factors (a Flux linear1 or T5 ΔW is never built densely)."""
    total = _lowrank_sq_norm(*want)
    diff = _lowrank_sq_norm(torch.cat([want[0], -got[0]], 1), torch.cat([want[1], got[1]], 0))
    return math.sqrt(max(diff, 0.0) / total) if total > 0 else math.sqrt(max(diff, 0.0))


def _keys(path) -> dict[str, torch.Tensor]:
    files = [path / "adapter_model.safetensors"] if path.is_dir() else [path]
    out = {}
    for file in files:
        with SafetensorsFile(file) as f:
            out.update({k: f.get(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("fam_name,layout", CASES)
def test_layout_round_trips_on_its_family(tmp_path, fam_name, layout):
    source = _adapter(fam_name, layout)
    if layout == "peft":  # one model per folder
        comp = next(iter(source.modules.values())).component
        source.modules = {k: m for k, m in source.modules.items() if m.component == comp}
    converted, report = convert(source, layout)
    assert report.exact, report.to_json()
    first = tmp_path / ("a" if layout == "peft" else "a.safetensors")
    write_adapter(converted, first, layout)
    back = read_adapter(first)
    assert back.source_format == layout and not back.unknown
    assert back.base_model == source.base_model, back.detection
    by_path = fam_name == "generic" and layout == "peft"
    want, got = _parts(source, fam_name, by_path), _parts(back, fam_name, by_path)
    assert set(got) >= set(want)
    for key, factors in want.items():
        assert _rel(factors, got[key]) <= 1e-6, key
    for key in set(got) - set(want):  # a fused weight's untrained part is exactly zero
        assert _lowrank_sq_norm(*got[key]) == 0.0, key
    second = tmp_path / ("b" if layout == "peft" else "b.safetensors")
    write_adapter(back, second, layout)
    one, two = _keys(first), _keys(second)
    assert sorted(one) == sorted(two)
    for key, tensor in one.items():
        assert torch.equal(tensor, two[key]), key


def test_every_writable_layout_applies_to_some_family():
    applied = {lay for f in all_families(include_generic=True) for lay in f.layouts}
    from loratool.formats.layouts import WRITABLE

    assert set(WRITABLE) <= applied
    assert len(CASES) >= 35


@pytest.mark.parametrize("fam_name,embeddings", [
    ("sd1", {"<cat>": (2, 768)}), ("sd2", {"<cat>": (3, 1024)}), ("sdxl", {"clip_l": (2, 768), "clip_g": (2, 1280)}),
])
def test_textual_inversion_round_trips(tmp_path, fam_name, embeddings):
    g = torch.Generator().manual_seed(2)
    a = Adapter(base_model=fam_name, embeddings={k: torch.randn(*s, generator=g) for k, s in embeddings.items()})
    first = tmp_path / "a.safetensors"
    write_adapter(a, first, "textual-inversion")
    back = read_adapter(first)
    assert back.source_format == "textual-inversion" and back.base_model == fam_name
    assert set(back.embeddings) == set(a.embeddings)
    for k, t in a.embeddings.items():
        assert torch.equal(back.embeddings[k], t)
    second = tmp_path / "b.safetensors"
    write_adapter(back, second, "textual-inversion")
    assert _keys(first).keys() == _keys(second).keys()
