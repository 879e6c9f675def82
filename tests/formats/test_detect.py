"""Per-key detection: every layout, its module name (placed by the family registry) and role; base-model
detection; unknown keys."""

from __future__ import annotations

import pytest
import torch

from loratool.arch import detect_adapter
from loratool.formats import decode, detect_keys
from loratool.formats.keys import parse_key

U = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
TE = "text_model.encoder.layers.0.self_attn"

CASES = [
    # kohya SD1 (diffusers block names) and SDXL (SAI block names)
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
     "kohya", "unet", f"{U}.to_q", "down"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight", "kohya", "unet", f"{U}.to_q", "up"),
    ("lora_unet_input_blocks_1_0_in_layers_2.alpha", "kohya", "unet", "down_blocks.0.resnets.0.conv1", "alpha"),
    ("lora_unet_input_blocks_3_0_op.lora_down.weight", "kohya", "unet", "down_blocks.0.downsamplers.0.conv", "down"),
    ("lora_unet_output_blocks_2_2_conv.lora_down.weight", "kohya", "unet", "up_blocks.0.upsamplers.0.conv", "down"),
    ("lora_unet_middle_block_1_proj_in.lora_mid.weight", "kohya", "unet", "mid_block.attentions.0.proj_in", "mid"),
    ("lora_unet_input_blocks_4_0_emb_layers_1.lora_down.weight", "kohya", "unet",
     "down_blocks.1.resnets.0.time_emb_proj", "down"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "kohya", "text_encoder",
     f"{TE}.q_proj", "down"),
    ("lora_te2_encoder_layers_0_self_attn_q_proj.lora_A.weight", "kohya", "text_encoder_2", f"{TE}.q_proj", "down"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.dora_scale", "kohya", "text_encoder",
     "text_model.encoder.layers.0.mlp.fc1", "dora_scale"),
    # LyCORIS tensors under kohya names (the kohya layout) or the LyCORIS wrapper's lycoris_ names
    ("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a", "kohya", "unet", "down_blocks.0.resnets.0.conv1",
     "hada_w1_a"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2_b", "kohya", "text_encoder",
     "text_model.encoder.layers.0.mlp.fc1", "lokr_w2_b"),
    ("lycoris_down_blocks_0_resnets_0_conv1.diff_b", "lycoris", "unet", "down_blocks.0.resnets.0.conv1", "diff_b"),
    ("lycoris_down_blocks_0_resnets_0_norm1.w_norm", "lycoris", "unet", "down_blocks.0.resnets.0.norm1", "w_norm"),
    # diffusers attention processors, with and without unet.
    (f"{U}.processor.to_out_lora.down.weight", "diffusers-attnproc", "unet", f"{U}.to_out.0", "down"),
    (f"unet.{U}.processor.to_k_lora.up.weight", "diffusers-attnproc", "unet", f"{U}.to_k", "up"),
    (f"text_encoder.{TE}.to_out_lora.up.weight", "diffusers-attnproc", "text_encoder", f"{TE}.out_proj", "up"),
    # diffusers lora.down/up and lora_linear_layer
    (f"unet.{U}.to_q.lora.down.weight", "diffusers-old", "unet", f"{U}.to_q", "down"),
    (f"text_encoder_2.{TE}.q_proj.lora_linear_layer.up.weight", "diffusers-old", "text_encoder_2",
     f"{TE}.q_proj", "up"),
    # diffusers PEFT
    (f"unet.{U}.to_q.lora_A.weight", "diffusers", "unet", f"{U}.to_q", "down"),
    ("text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight", "diffusers", "text_encoder",
     f"{TE}.q_proj", "up"),
    (f"unet.{U}.to_q.lora_magnitude_vector", "diffusers", "unet", f"{U}.to_q", "magnitude"),
    ("transformer.transformer_blocks.0.attn.to_q.lora_B.bias", "diffusers", "transformer",
     "transformer_blocks.0.attn.to_q", "bias"),
    # peft native
    ("base_model.model.down_blocks.0.resnets.0.conv1.lora_A.weight", "peft", "unet", "down_blocks.0.resnets.0.conv1",
     "down"),
    # Flux: kohya, BFL, OneTrainer, XLabs
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "kohya", "transformer",
     "transformer_blocks.0.attn.to_qkv", "down"),
    ("lora_unet_single_blocks_3_linear1.alpha", "kohya", "transformer", "single_transformer_blocks.3.to_qkv_mlp",
     "alpha"),
    ("diffusion_model.double_blocks.2.txt_attn.qkv.lora_A.weight", "original", "transformer",
     "transformer_blocks.2.attn.to_added_qkv", "down"),
    ("diffusion_model.single_blocks.9.linear2.lora_B.weight", "original", "transformer",
     "single_transformer_blocks.9.proj_out", "up"),
    ("lora_transformer_transformer_blocks_9_attn_to_add_out.lora_down.weight", "onetrainer", "transformer",
     "transformer_blocks.9.attn.to_add_out", "down"),
    ("double_blocks.1.processor.qkv_lora2.up.weight", "xlabs", "transformer",
     "transformer_blocks.1.attn.to_added_qkv", "up"),
    ("double_blocks.1.processor.proj_lora1.down.weight", "xlabs", "transformer",
     "transformer_blocks.1.attn.to_out.0", "down"),
]


@pytest.mark.parametrize("key,family,component,path,role", CASES)
def test_parse_key(key, family, component, path, role):
    ref = parse_key(key)
    assert ref is not None, key
    _, (place,) = detect_adapter([ref.module_id], [None])
    assert (ref.layout, place.component, place.path, ref.role) == (family, component, path, role)


@pytest.mark.parametrize("key", [
    "lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k_lora_down.weight",
    "model.diffusion_model.input_blocks.0.0.weight", "metadata_key_for_stripped_models", "alpha", "lora_down.weight",
])
def test_unknown_keys(key):
    assert parse_key(key) is None


def test_detect_keys_sorts_known_and_unknown_by_name():
    keys = [f"unet.{U}.to_q.lora_A.weight", "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha", "weird.key"]
    report = detect_keys(keys)
    assert report.unknown == ["weird.key"]
    assert report.layouts == ["diffusers", "kohya"]


def test_special_layouts():
    assert detect_keys(["unet:0:up", "unet:0:down", "<s1>"]).special == "cloneofsimo"
    assert detect_keys(["emb_params"]).special == "textual-inversion"
    assert detect_keys(["clip_l", "clip_g"]).special == "textual-inversion"
    assert detect_keys(["0", "1"]).special == "cloneofsimo-legacy"


def _lora(key: str, out: int, inp: int, r: int = 2, kohya: bool = True) -> dict[str, torch.Tensor]:
    down, up = ("lora_down.weight", "lora_up.weight") if kohya else ("lora_A.weight", "lora_B.weight")
    return {f"{key}.{down}": torch.zeros(r, inp), f"{key}.{up}": torch.zeros(out, r)}


@pytest.mark.parametrize("width,base", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_base_model_from_cross_attention_width(width, base):
    t = _lora("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, width)
    assert decode(t).base_model == base


def test_base_model_from_names():
    sdxl = _lora("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", 640, 640)
    assert decode(sdxl).base_model == "sdxl"
    te_sdxl = {**_lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
               **_lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)}
    assert decode(te_sdxl).base_model == "sdxl"
    assert decode(_lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024)).base_model == "sd2"
    assert decode(_lora("lora_unet_single_blocks_0_linear2", 3072, 15360)).base_model == "flux"
    flux_diff = _lora("transformer.transformer_blocks.0.attn.to_q", 3072, 3072, kohya=False)
    assert decode(flux_diff).base_model == "flux"
    sd3_diff = _lora("transformer.transformer_blocks.0.attn.to_q", 1536, 1536, kohya=False)
    assert decode(sd3_diff).base_model == "sd3"
    assert decode(_lora("lora_unet_foo_bar", 4, 4)).base_model == "unknown"


def test_mixed_file_is_reported_as_a_list():
    t = {**_lora("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 768),
         **_lora(f"unet.{U}.to_q", 640, 640, kohya=False)}
    a = decode(t)
    assert a.source_format == ["diffusers", "kohya"]
    assert len(a.modules) == 2


def test_two_spellings_of_one_module_keep_the_first_and_name_the_second():
    t = {**_lora(f"lora_unet_{U.replace('.', '_')}_to_q", 640, 640),
         **_lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640)}
    a = decode(t)
    assert len(a.modules) == 1
    assert sorted(a.unknown) == sorted(k for k in t if "input_blocks" in k)
    assert all("same tensor as" in a.unknown_reasons[k] for k in a.unknown)


def test_lone_factor_is_unknown_with_reason():
    t = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 4)}
    a = decode(t)
    assert not a.modules and a.unknown == list(t)
    assert "without its partner" in a.unknown_reasons[a.unknown[0]]


def test_comfy_native_sd_unet_ids():
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight"
    ref = parse_key(key)
    _, (place,) = detect_adapter([ref.module_id], [None])
    assert (ref.layout, place.component, place.path) == ("original", "unet", f"{U}.to_q")
    assert decode({key: torch.zeros(4, 320), key.replace("lora_A", "lora_B"): torch.zeros(320, 4)}).source_format == "ldm"


@pytest.mark.parametrize("key,words", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks", "OFT"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.on_input", "(IA)3"),
    ("lora_unet_unet_down_blocks_0_attentions_0_proj_in_lora_down.weight", "joined with '_'"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.a1.weight", "GLoRA"),
    ("base_model.model.q_proj.lora_E", "AdaLoRA"),
    ("bundle_emb.tok.string_to_param.*", "bundle_emb"),
    ("lora_prior_unet_down_blocks_0_attn_to_q.lora_down.weight", "Stable Cascade"),
    ("diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale", "replaces the weight"),
    ("something.else", "no known adapter key layout"),
])
def test_unknown_keys_say_why(key, words):
    a = decode({key: torch.zeros(2, 2)})
    assert a.unknown == [key] and words in a.unknown_reasons[key]
