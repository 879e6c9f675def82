"""Every wild layout of the new families is read: keys spelt as each trainer writes them (reference/families.md),
read into the canonical adapter, land on the module they mean with the ΔW they carry.

Two oracles: where diffusers has a converter for the layout, the converter's output (diffusers names, alpha
folded) is the ΔW each module must have; elsewhere a key table written from the reference (trainer key ->
diffusers module) says where each key must land. Full-size shapes at rank 1 (small tensors)."""

from __future__ import annotations

import family_models as fm
import pytest
import torch

from loratool.arch import family
from loratool.formats import decode

pytest.importorskip("diffusers")
from diffusers.loaders import lora_conversion_utils as dc  # noqa: E402

DOWN_UP = {"A": (".lora_A.weight", ".lora_B.weight"), "down": (".lora_down.weight", ".lora_up.weight"),
           "default": (".lora_A.default.weight", ".lora_B.default.weight"), "dot": (".lora.down.weight", ".lora.up.weight")}


def _file(fam_name: str, stems: dict[str, str], style: str, alpha: bool, seed: int = 0, rank: int = 1,
          sizes: dict | None = None) -> dict[str, torch.Tensor]:
    """Tensors under ``stem + suffix`` for each stem, shaped as the canonical module it names (a fused pseudo-module
    for a fused stem), random, with an ``.alpha`` per stem when asked."""
    fam = family(fam_name) if sizes is None else family(fam_name).at({**family(fam_name).sizes, **sizes})
    g = torch.Generator().manual_seed(seed)
    down_s, up_s = DOWN_UP[style]
    out = {}
    for i, (stem, key) in enumerate(stems.items()):
        rows, cols = fam.shape(key)
        out[stem + down_s] = torch.randn(rank, cols, generator=g) * 0.1
        out[stem + up_s] = torch.randn(rows, rank, generator=g) * 0.1
        if alpha:
            out[stem + ".alpha"] = torch.tensor(float(1 + i % 4))
    return out


WAN_BLOCK = {"self_attn_q": "attn1.to_q", "self_attn_k": "attn1.to_k", "self_attn_v": "attn1.to_v",
             "self_attn_o": "attn1.to_out.0", "cross_attn_q": "attn2.to_q", "cross_attn_k": "attn2.to_k",
             "cross_attn_v": "attn2.to_v", "cross_attn_o": "attn2.to_out.0", "ffn_0": "ffn.net.0.proj",
             "ffn_2": "ffn.net.2"}


@pytest.mark.parametrize("double", [False, True], ids=["musubi", "wan-fun"])
def test_wan_musubi_and_wan_fun(double):
    """musubi's lora_unet_blocks_N_self_attn_q (Wan-Fun: lora_unet__blocks_…) as diffusers' musubi converter reads it."""
    stems = {f"lora_unet_blocks_{i}_{k}": f"transformer.blocks.{i}.{v}" for i in range(2) for k, v in WAN_BLOCK.items()}
    tensors = _file("wan", stems, "down", alpha=True)
    theirs = fm.oracle(dc._convert_musubi_wan_lora_to_diffusers(fm.cloned(tensors)))
    if double:
        tensors = {k.replace("lora_unet_", "lora_unet__"): v for k, v in tensors.items()}
    a = decode(tensors)
    assert a.base_model == "wan" and not a.unknown and a.source_format == "kohya"
    fm.same(fm.factors(a, "wan"), theirs)


@pytest.mark.parametrize("style,alpha", [("A", False), ("down", True)], ids=["diffusion-pipe", "lightx2v"])
def test_wan_diffusion_model_with_bias_deltas(style, alpha):
    """diffusion-pipe/ai-toolkit ``diffusion_model.blocks.N.self_attn.q.lora_A`` and the distill LoRAs' lora_down +
    alpha + ``.diff_b`` (read as the LoRA's bias change) and norm ``.diff``; diffusers' converter as oracle."""
    stems = {f"diffusion_model.blocks.{i}.{k.replace('_attn_', '_attn.').replace('ffn_', 'ffn.')}": f"transformer.blocks.{i}.{v}"
             for i in range(2) for k, v in WAN_BLOCK.items()}
    stems["diffusion_model.blocks.1.cross_attn.k_img"] = "transformer.blocks.1.attn2.add_k_proj"
    stems["diffusion_model.blocks.1.cross_attn.v_img"] = "transformer.blocks.1.attn2.add_v_proj"
    if not alpha:  # diffusers' converter reads no alpha for head.head
        stems["diffusion_model.head.head"] = "transformer.proj_out"
    tensors = _file("wan", stems, style, alpha)
    g = torch.Generator().manual_seed(3)
    tensors["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.randn(5120, generator=g)
    norm = tensors["diffusion_model.blocks.0.norm3.diff"] = torch.randn(5120, generator=g)
    converted = dc._convert_non_diffusers_wan_lora_to_diffusers(fm.cloned(tensors))  # drops the norm delta
    a = decode(tensors)
    assert a.base_model == "wan" and a.source_format == "bfl" and a.detection.variant == "14B-I2V" and not a.unknown
    assert torch.equal(a.modules.pop("transformer.blocks.0.norm2").diff, norm)  # original norm3 is diffusers' norm2
    fm.same(fm.factors(a, "wan"), fm.oracle(converted))
    ours = a.modules["transformer.blocks.0.attn1.to_q"]
    assert torch.allclose((ours.bias * ours.scale).double(), converted["transformer.blocks.0.attn1.to_q.lora_B.bias"].double())


HUNYUAN_STEMS = {"double_blocks.0.img_attn_qkv": "transformer.transformer_blocks.0.attn.to_qkv",
                 "double_blocks.0.txt_attn_proj": "transformer.transformer_blocks.0.attn.to_add_out",
                 "double_blocks.1.img_mlp.fc1": "transformer.transformer_blocks.1.ff.net.0.proj",
                 "double_blocks.1.txt_mod.linear": "transformer.transformer_blocks.1.norm1_context.linear",
                 "single_blocks.5.linear1": "transformer.single_transformer_blocks.5.to_qkv_mlp",
                 "single_blocks.5.linear2": "transformer.single_transformer_blocks.5.proj_out"}


@pytest.mark.parametrize("prefix", ["transformer.", "diffusion_model."])
def test_hunyuan_original_names(prefix):
    """diffusion-pipe writes Tencent names under ``transformer.`` (older files ``diffusion_model.``); diffusers'
    HunyuanVideo converter is the oracle (q/k/v and linear1 cut at the real width)."""
    tensors = _file("hunyuan-video", {prefix + k: v for k, v in HUNYUAN_STEMS.items()}, "A", alpha=False)
    a = decode(tensors)
    assert a.base_model == "hunyuan-video" and not a.unknown and a.source_format == "bfl"
    fm.same(fm.factors(a, "hunyuan-video"), fm.oracle(dc._convert_hunyuan_video_lora_to_diffusers(fm.cloned(tensors))))


def test_hunyuan_musubi_and_comfy_ids_are_one_module():
    """musubi's ids carry Tencent names (img_mlp_fc1, img_mod_linear), ComfyUI's its own (img_mlp_0, img_mod_lin):
    both read to the same module; the file is reported musubi only where its names are musubi's. ComfyUI's ids are
    Flux's ids at Flux's widths: without metadata both families fit and both are said; the metadata we write decides."""
    musubi = {f"lora_unet_{k.replace('.', '_')}": v for k, v in HUNYUAN_STEMS.items()}
    comfy = {k.replace("img_mlp_fc1", "img_mlp_0").replace("txt_mod_linear", "txt_mod_lin"): v for k, v in musubi.items()}
    a = decode(_file("hunyuan-video", musubi, "down", alpha=True))
    assert a.base_model == "hunyuan-video" and not a.unknown and a.source_format == "musubi"
    assert set(a.modules) == set(HUNYUAN_STEMS.values())
    tensors = _file("hunyuan-video", comfy, "down", alpha=True)
    a = decode(tensors, arch="hunyuan-video")
    assert set(a.modules) == set(HUNYUAN_STEMS.values()) and a.source_format == "kohya"
    assert set(decode(tensors).detection.candidates) == {"flux", "hunyuan-video"}
    assert decode(tensors, {"modelspec.architecture": "hunyuan-video/lora"}).base_model == "hunyuan-video"


QWEN = {"transformer_blocks.0.attn.to_q": "q", "transformer_blocks.0.attn.add_k_proj": "", "transformer_blocks.1.img_mlp.net.0.proj": "",
        "transformer_blocks.1.txt_mod.1": "", "transformer_blocks.2.attn.to_add_out": "", "img_in": "", "norm_out.linear": ""}


@pytest.mark.parametrize("spell,style,alpha", [
    (lambda p: f"lora_unet_{p.replace('.', '_')}", "down", True),  # musubi
    (lambda p: f"diffusion_model.{p}", "A", False),  # diffusion-pipe, ai-toolkit
    (lambda p: p, "A", True),  # bare with alpha (diffusers folds it: the dropped-alpha report is older)
    (lambda p: p, "default", False),  # PEFT's default adapter (DiffSynth)
], ids=["musubi", "diffusion_model", "bare-alpha", "default"])
def test_qwen_layouts(spell, style, alpha):
    stems = {spell(p): f"transformer.{p}" for p in QWEN}
    tensors = _file("qwen-image", stems, style, alpha)
    a = decode(tensors)
    assert a.base_model == "qwen-image" and not a.unknown
    fm.same(fm.factors(a, "qwen-image"), fm.oracle(dc._convert_non_diffusers_qwen_lora_to_diffusers(fm.cloned(tensors))))


Z_SPLIT = {"layers.0.attention.to_q": "", "layers.0.attention.to_out.0": "", "layers.3.feed_forward.w2": "",
           "noise_refiner.1.adaLN_modulation.0": "", "context_refiner.0.attention.to_v": ""}


@pytest.mark.parametrize("spell,style,alpha", [
    (lambda p: f"lora_unet_{p.replace('.', '_')}", "down", True),  # musubi native
    (lambda p: f"diffusion_model.{p}", "A", False),  # ai-toolkit
], ids=["musubi", "ai-toolkit"])
def test_zimage_split_layouts(spell, style, alpha):
    tensors = _file("z-image", {spell(p): f"transformer.{p}" for p in Z_SPLIT}, style, alpha)
    a = decode(tensors)
    assert a.base_model == "z-image" and not a.unknown
    fm.same(fm.factors(a, "z-image"), fm.oracle(dc._convert_non_diffusers_z_image_lora_to_diffusers(fm.cloned(tensors))))


def test_zimage_fused_comfy_ids_in_dot_style():
    """ComfyUI-style fused q/k/v (musubi's convert_z_image_lora_to_comfy names) in the dot style diffusers reads."""
    stems = {"lora_unet_layers_1_attention_qkv": "transformer.layers.1.attention.to_qkv",
             "lora_unet_layers_1_attention_out": "transformer.layers.1.attention.to_out.0",
             "lora_unet_layers_1_feed_forward_w1": "transformer.layers.1.feed_forward.w1"}
    tensors = _file("z-image", stems, "dot", alpha=True)
    a = decode(tensors)
    assert a.base_model == "z-image" and not a.unknown
    fm.same(fm.factors(a, "z-image"), fm.oracle(dc._convert_non_diffusers_z_image_lora_to_diffusers(fm.cloned(tensors))))


def test_lumina2_diffusion_model_fused_gqa():
    block = {"attention.qkv": "attn.to_qkv", "attention.out": "attn.to_out.0", "feed_forward.w1": "feed_forward.linear_1",
             "feed_forward.w2": "feed_forward.linear_2", "feed_forward.w3": "feed_forward.linear_3",
             "adaLN_modulation.1": "norm1.linear"}
    tensors = _file("lumina2", {f"diffusion_model.layers.0.{k}": f"transformer.layers.0.{v}" for k, v in block.items()},
                    "A", alpha=False)
    a = decode(tensors)
    assert a.base_model == "lumina2" and not a.unknown
    fm.same(fm.factors(a, "lumina2"), fm.oracle(dc._convert_non_diffusers_lumina2_lora_to_diffusers(fm.cloned(tensors))))


def test_fal_kontext_files():
    """fal's Kontext trainer: base_model.model. + BFL names (diffusers' converter wants every block whole)."""
    double = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_attn.qkv": "attn.to_qkv",
              "txt_attn.qkv": "attn.to_added_qkv", "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
              "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
              "txt_mlp.2": "ff_context.net.2"}
    single = {"linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear"}
    stems = {f"base_model.model.double_blocks.{i}.{k}": f"transformer.transformer_blocks.{i}.{v}"
             for i in range(19) for k, v in double.items()}
    stems |= {f"base_model.model.single_blocks.{i}.{k}": f"transformer.single_transformer_blocks.{i}.{v}"
              for i in range(38) for k, v in single.items()}
    stems |= {"base_model.model.final_layer.linear": "transformer.proj_out"}
    tensors = _file("flux", stems, "A", alpha=False)
    theirs = fm.oracle(dc._convert_fal_kontext_lora_to_diffusers(fm.cloned(tensors)))
    a = decode(tensors)
    assert a.base_model == "flux" and a.source_format == "fal" and not a.unknown
    fm.same(fm.factors(a, "flux"), theirs)


@pytest.mark.parametrize("fam_name,stems,style,alpha,layout", [
    ("hidream", {"lycoris_double_stream_blocks_0_block_attn1_to_q_t": "double_stream_blocks.0.block.attn1.to_q_t",
                 "lycoris_single_stream_blocks_3_block_ff_i_experts_2_w3": "single_stream_blocks.3.block.ff_i.experts.2.w3"},
     "down", True, "lycoris"),  # SimpleTuner's LyCORIS ids
    ("chroma", {"diffusion_model.double_blocks.3.img_attn.qkv": "transformer_blocks.3.attn.to_qkv",
                "diffusion_model.single_blocks.7.linear1": "single_transformer_blocks.7.to_qkv_mlp",
                "diffusion_model.distilled_guidance_layer.layers.2.in_layer": "distilled_guidance_layer.layers.2.linear_1"},
     "A", False, "bfl"),  # ai-toolkit / diffusion-pipe (diffusers cannot read these)
    ("sd3", {"lora_transformer_transformer_blocks_30_attn2_to_q": "transformer_blocks.30.attn2.to_q",
             "lora_transformer_transformer_blocks_37_attn_add_k_proj": "transformer_blocks.37.attn.add_k_proj"},
     "down", True, "onetrainer"),  # OneTrainer on SD3.5 Large / Medium
    ("ltx-video", {"diffusion_model.transformer_blocks.40.attn2.to_k": "transformer_blocks.40.attn2.to_k",
                   "diffusion_model.adaln_single.linear": "time_embed.linear"}, "A", False, "bfl"),  # 13B depth
    ("lumina2", {"lora_unet_layers_3_attention_qkv": "layers.3.attn.to_qkv",
                 "lora_unet_noise_refiner_1_adaLN_modulation_1": "noise_refiner.1.norm1.linear"}, "down", True, "kohya"),
])
def test_key_tables(fam_name, stems, style, alpha, layout):
    """Trainer keys (reference/families.md) -> the diffusers module each means, where diffusers has no converter."""
    sizes = {"sd3": {"H": 2432, "D": 38, "X": 32}, "ltx-video": {"H": 4096, "D": 48, "X": 4096}}.get(fam_name)
    tensors = _file(fam_name, {k: f"transformer.{v}" for k, v in stems.items()}, style, alpha, sizes=sizes)
    a = decode(tensors)
    assert a.base_model == fam_name and not a.unknown, a.detection
    assert a.source_format == layout
    assert set(a.modules) == {f"transformer.{v}" for v in stems.values()}


def test_musubi_network_flags_rslora_and_dora():
    """musubi-tuner networks that save ``use_rslora_flag``/``use_dora_flag`` beside the modules (the Blissful-tuner
    fork's LoRANetwork) and DoRA magnitudes as ``.dora_layer.weight``: scale alpha/√r for every module, the
    magnitude per output row as musubi merges it, m · (W + sBA) / ‖W + sBA‖ by row; the flags are not modules."""
    stems = {"lora_unet_blocks_0_self_attn_q": "transformer.blocks.0.attn1.to_q",
             "lora_unet_blocks_0_ffn_0": "transformer.blocks.0.ffn.net.0.proj"}
    tensors = _file("wan", stems, "down", alpha=True, rank=4, sizes={"H": 1536, "F": 8960, "D": 30})  # 1.3B
    g = torch.Generator().manual_seed(7)
    tensors["lora_unet_blocks_0_self_attn_q.dora_layer.weight"] = torch.rand(1536, generator=g) + 0.5
    tensors["use_rslora_flag"], tensors["use_dora_flag"] = torch.tensor(True), torch.tensor(True)
    a = decode(tensors)
    assert a.base_model == "wan" and not a.unknown and set(a.modules) == set(stems.values())
    q, ffn = a.modules["transformer.blocks.0.attn1.to_q"], a.modules["transformer.blocks.0.ffn.net.0.proj"]
    assert q.rslora and ffn.rslora and q.scale == float(tensors["lora_unet_blocks_0_self_attn_q.alpha"]) / 2
    assert ffn.dora is None and q.dora is not None
    w = torch.randn(1536, 1536, generator=g, dtype=torch.float64) * 0.02  # musubi's merge_to, by hand
    s = float(tensors["lora_unet_blocks_0_self_attn_q.alpha"]) / 4 ** 0.5
    merged = w + s * tensors["lora_unet_blocks_0_self_attn_q.lora_up.weight"].double() @ \
        tensors["lora_unet_blocks_0_self_attn_q.lora_down.weight"].double()
    want = tensors["lora_unet_blocks_0_self_attn_q.dora_layer.weight"].double()[:, None] / merged.norm(dim=1,
                                                                                                       keepdim=True) * merged
    got = q.dora.apply(w, q.delta(torch.float64))
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    plain = decode({k: v for k, v in tensors.items() if k != "use_rslora_flag"}).modules["transformer.blocks.0.ffn.net.0.proj"]
    assert not plain.rslora


@pytest.mark.parametrize("prefix,layout", [("", "bfl"), ("base_model.model.", "bfl"), ("diffusion_model.", "bfl")])
def test_wan_original_names_bare_and_under_peft_scope(prefix, layout):
    """Wan LoRAs in the original names with no prefix (DiffSynth-Studio) or under peft's ``base_model.model.`` (a
    peft save of the original WanModel, as some distill LoRAs ship): Wan, read as the single-file layout they are
    (``fal`` is the name of that spelling for Flux only)."""
    stems = {f"{prefix}blocks.{i}.{k.replace('_attn_', '_attn.').replace('ffn_', 'ffn.')}": f"transformer.blocks.{i}.{v}"
             for i in range(2) for k, v in WAN_BLOCK.items()}
    a = decode(_file("wan", stems, "A", alpha=False))
    assert a.base_model == "wan" and a.source_format == layout and not a.unknown
    assert set(a.modules) == set(stems.values())


@pytest.mark.parametrize("width,k_img,variant", [(5120, False, "14B"), (5120, True, "14B-I2V"), (3072, False, "5B"),
                                                 (1536, False, "1.3B")])
def test_wan_variant_from_the_lora_itself(width, k_img, variant):
    """The variant said is the one the LoRA's own shapes and modules fit: a 14B LoRA without k_img/v_img is the
    text-to-video 14B (2.1 T2V, either 2.2 A14B expert), not the image-to-video model whose table also lists it."""
    ffn = {5120: 13824, 3072: 14336, 1536: 8960}[width]
    sizes = {"H": width, "F": ffn, "D": 30 if width < 5120 else 40}
    stems = {"diffusion_model.blocks.0.self_attn.q": "transformer.blocks.0.attn1.to_q",
             "diffusion_model.blocks.29.ffn.0": "transformer.blocks.29.ffn.net.0.proj"}
    if k_img:
        stems["diffusion_model.blocks.3.cross_attn.k_img"] = "transformer.blocks.3.attn2.add_k_proj"
    a = decode(_file("wan", stems, "A", alpha=False, sizes={**sizes, "I": int(k_img)}))
    assert a.base_model == "wan" and a.detection.variant == variant and not a.unknown
