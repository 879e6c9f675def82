"""The architecture tables and their API (no files outside the package)."""

from __future__ import annotations

import pytest
import torch

from loratool.arch import ARCH_NAMES, detect_arch_from_checkpoint, family, lbw_presets, lbw_weights, load_arch
from loratool.arch.convert import checkpoint_to_diffusers, diffusers_to_checkpoint
from loratool.errors import LoraToolError


def count(arch_name, kind, components, fused=True):
    return len(load_arch(arch_name).targets(kind, fused=fused, components=components))


@pytest.mark.parametrize(("arch_name", "te", "attn", "conv"), [
    ("sd1", 72, 192, 278), ("sd2", 138, 192, 278), ("sdxl", 264, 722, 788),
])
def test_module_counts_match_kohya(arch_name, te, attn, conv):
    tes = tuple(c for c in load_arch(arch_name).components if c.startswith("text_encoder"))
    assert count(arch_name, "transformer", tes) == te
    assert count(arch_name, "transformer", ("unet",)) == attn
    assert count(arch_name, "transformer+conv", ("unet",)) == conv
    assert count(arch_name, "attn+conv", ("unet",)) == conv  # the old name of the same set


def test_flux_and_sd3_counts():
    assert count("flux", "transformer", ("transformer",)) == 19 * 10 + 38 * 3
    assert count("flux", "transformer", ("transformer",), fused=False) == 19 * (10 + 4) + 38 * (3 + 3)
    assert count("flux", "transformer", ("text_encoder",)) == 72
    assert count("flux", "transformer", ("text_encoder_2",)) == 24 * 7
    # SD3 medium: 23 full joint blocks (x and context: qkv, proj, fc1, fc2, adaLN) + the last block whose
    # context side is pre-only (qkv and adaLN)
    assert count("sd3", "transformer", ("transformer",)) == 23 * 10 + 5 + 2


def test_attn_is_the_attention_projections():
    """--targets attn: q, k, v, out (fused q/k/v where the family fuses them) and nothing of the feed-forward."""
    assert count("sd1", "attn", ("unet",)) == 16 * 2 * 4 and count("sd1", "attn", ("text_encoder",)) == 12 * 4
    # Flux: double blocks' to_qkv, to_added_qkv, to_out.0, to_add_out; single blocks' linear1 (holds q, k, v)
    assert count("flux", "attn", ("transformer",)) == 19 * 4 + 38
    assert count("flux", "attn", ("transformer",), fused=False) == 19 * 8 + 38 * 3
    assert count("flux", "attn", ("text_encoder_2",)) == 24 * 4  # T5: q, k, v, o
    keys = [s.key for s in load_arch("sdxl").targets("attn")]
    assert all(k.endswith(("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")) for k in keys)


def test_components():
    assert load_arch("sdxl").components == ("unet", "text_encoder", "text_encoder_2")
    assert load_arch("flux").components == ("transformer", "text_encoder", "text_encoder_2")
    assert load_arch("sd3").components == ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    assert load_arch("sd15") is load_arch("sd1")
    with pytest.raises(LoraToolError, match="unknown architecture"):
        load_arch("sdxxl")


@pytest.mark.parametrize("arch_name", ["sd1", "sd2", "sdxl"])
def test_every_unet_module_has_one_lbw_block_and_te_is_base(arch_name):
    arch = load_arch(arch_name)
    slots = set(arch.lbw["slots"])
    for spec in arch.modules.values():
        if spec.component == "unet":
            assert spec.block in slots and spec.block != "BASE", spec.key
        else:
            assert spec.block == "BASE", spec.key


def test_lbw_blocks_follow_sai_numbering():
    sd1, sdxl = load_arch("sd1"), load_arch("sdxl")
    assert sd1.modules["unet.down_blocks.1.attentions.1.proj_in"].block == "IN05"
    assert sd1.modules["unet.down_blocks.2.downsamplers.0.conv"].block == "IN09"
    assert sd1.modules["unet.up_blocks.3.attentions.2.proj_out"].block == "OUT11"
    assert sd1.modules["unet.mid_block.attentions.0.proj_out"].block == "MID"
    assert sdxl.modules["unet.up_blocks.1.attentions.0.proj_out"].block == "OUT03"
    assert sdxl.modules["unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"].block == "IN08"
    # the 17/12-value vectors name exactly the blocks that hold attention modules
    for arch, n in ((sd1, "17"), (sdxl, "12")):
        attn_blocks = {s.block for s in arch.targets("transformer")}
        assert attn_blocks == set(arch.lbw["vectors"][n])


def test_lbw_weights_parse():
    w = lbw_weights("sd1", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1")
    assert w["BASE"] == 1 and w["IN01"] == 0 and w["MID"] == 0 and w["OUT03"] == 1
    assert w["IN00"] == 1 and w["IN03"] == 1  # not named by a 17-vector: weight 1
    assert lbw_weights("sd1", "outall") == w
    assert lbw_weights("sd2", "INS")["IN04"] == 1 and lbw_weights("sd2", "INS")["IN05"] == 0
    full = lbw_weights("sd1", ",".join(str(i) for i in range(26)))
    assert full["OUT11"] == 25 and full["MID"] == 13
    xl = lbw_weights("sdxl", "0,1,1,1,1,0.5,0,0,0,0,0,0")
    assert xl["BASE"] == 0 and xl["MID"] == 0.5 and xl["OUT05"] == 0 and xl["OUT06"] == 1
    assert set(lbw_weights("sdxl", "ALL0.5").values()) == {0.5}
    assert len(lbw_weights("flux", "NONE")) == 61
    assert "MIDD" in lbw_presets("sd1") and "MIDD" not in lbw_presets("sdxl")


@pytest.mark.parametrize(("arch_name", "spec", "message"), [
    ("sd1", "1,0,1", "need 17 or 26 values, got 3"),
    ("sdxl", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0", "need 12 or 20 values, got 17"),
    ("sdxl", "MIDD", "not a preset of sdxl"),
    ("sd1", "1,a,0", "comma-separated list of numbers"),
])
def test_lbw_weights_errors(arch_name, spec, message):
    with pytest.raises(LoraToolError, match=message):
        lbw_weights(arch_name, spec)


def test_kohya_names_both_spellings():
    sd1, sdxl = load_arch("sd1"), load_arch("sdxl")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert sd1.to_kohya(key) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert family("sd1").from_kohya("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q") == key
    xkey = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert sdxl.to_kohya(xkey) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert family("sdxl").from_kohya("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == xkey
    assert family("sdxl").from_kohya("lora_unet_input_blocks_3_0_op") == "unet.down_blocks.0.downsamplers.0.conv"
    assert sdxl.to_kohya("unet.up_blocks.0.upsamplers.0.conv") == "lora_unet_output_blocks_2_2_conv"
    assert sdxl.to_kohya("unet.up_blocks.1.resnets.0.conv_shortcut") == "lora_unet_output_blocks_3_0_skip_connection"
    te = "text_encoder_2.text_model.encoder.layers.3.mlp.fc2"
    assert sdxl.to_kohya(te) == "lora_te2_text_model_encoder_layers_3_mlp_fc2"
    assert family("sdxl").from_kohya("lora_te2_encoder_layers_3_mlp_fc2") == te
    assert family("sd1").from_kohya("lora_te_encoder_layers_0_self_attn_q_proj") == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert family("sdxl").from_kohya("lora_te_text_model_encoder_layers_0_mlp_fc1") is None
    with pytest.raises(LoraToolError, match="not a module"):
        sdxl.to_kohya("unet.nothing")


def test_flux_fused_modules():
    flux = load_arch("flux")
    qkv = "transformer.transformer_blocks.3.attn.to_qkv"
    assert flux.fused[qkv] == [("transformer.transformer_blocks.3.attn.to_q", (0, 3072)),
                               ("transformer.transformer_blocks.3.attn.to_k", (3072, 6144)),
                               ("transformer.transformer_blocks.3.attn.to_v", (6144, 9216))]
    assert flux.modules[qkv].shape == (9216, 3072)
    assert flux.to_kohya(qkv) == "lora_unet_double_blocks_3_img_attn_qkv"
    assert family("flux").from_kohya("lora_unet_double_blocks_3_img_attn_qkv") == qkv
    assert family("flux").from_kohya("lora_unet_double_blocks_3_txt_attn_qkv") == \
        "transformer.transformer_blocks.3.attn.to_added_qkv"
    lin1 = "transformer.single_transformer_blocks.7.to_qkv_mlp"
    assert flux.fused[lin1][-1] == ("transformer.single_transformer_blocks.7.proj_mlp", (9216, 21504))
    part = flux.modules["transformer.single_transformer_blocks.7.attn.to_k"]
    assert part.fused_in == lin1 and part.checkpoint_rows == (3072, 6144) and part.block == "S07"
    assert flux.to_kohya("transformer.single_transformer_blocks.7.proj_out") == "lora_unet_single_blocks_7_linear2"
    assert flux.to_kohya("transformer.transformer_blocks.0.ff_context.net.2") == "lora_unet_double_blocks_0_txt_mlp_2"
    assert family("flux").from_kohya("lora_transformer_single_transformer_blocks_0_attn_to_k") == \
        "transformer.single_transformer_blocks.0.attn.to_k"
    assert flux.to_kohya("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q") == \
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    entries = flux.checkpoint_map["model.diffusion_model.single_blocks.7.linear1.weight"]
    assert entries[0] == (lin1, None) and [r for _, r in entries[1:]] == [
        (0, 3072), (3072, 6144), (6144, 9216), (9216, 21504)]
    assert flux.modules["transformer.norm_out.linear"].row_order == ((3072, 6144), (0, 3072))


def _row_tensor(shape, op=None):
    """Values that identify the row, expanded (no copy) to the full shape."""
    rows = torch.arange(shape[0], dtype=torch.int32)
    return rows.reshape(shape[0], *([1] * (len(shape) - 1))).expand(*shape)


@pytest.mark.parametrize(("arch_name", "key"), [
    ("sd3", "model.diffusion_model.joint_blocks.2.context_block.attn.qkv.weight"),
    ("sd3", "model.diffusion_model.final_layer.adaLN_modulation.1.weight"),
    ("sdxl", "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_bias"),
    ("sdxl", "conditioner.embedders.1.model.text_projection"),
    ("sd1", "first_stage_model.decoder.mid.attn_1.q.weight"),
    ("sd1", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
])
def test_convert_round_trip(arch_name, key):
    arch = load_arch(arch_name)
    shape = arch.checkpoint_shape(key)
    tensor = _row_tensor(shape) if len(shape) != 2 or shape[0] != shape[1] else torch.randn(shape)
    parts = checkpoint_to_diffusers(arch, key, tensor)
    for p, t in parts:
        assert tuple(t.shape) == p.shape
    got = {p: t for p, t in parts}
    back = diffusers_to_checkpoint(arch, key, got.__getitem__)
    assert torch.equal(back, tensor)
    if "adaLN" in key:  # shift and scale trade places
        (p, t), = parts
        assert t[0, 0] == shape[0] // 2 and t[-1, 0] == shape[0] // 2 - 1
    if key.endswith("text_projection"):
        (p, t), = parts
        assert torch.equal(t, tensor.t())
    with pytest.raises(LoraToolError, match="expects"):
        checkpoint_to_diffusers(arch, key, torch.zeros(3))


def test_detect_from_diffusers_and_lora_free_keys():
    sd2 = load_arch("sd2").diffusers_param_map("unet")
    assert detect_arch_from_checkpoint({n: p.shape for (_, n), p in sd2.items()}) == "sd2"
    sd1 = load_arch("sd1").diffusers_param_map("unet")
    assert detect_arch_from_checkpoint([(n, p.shape) for (_, n), p in sd1.items()]) == "sd1"
    te = load_arch("sd2").diffusers_param_map("text_encoder")
    assert detect_arch_from_checkpoint({n: p.shape for (_, n), p in te.items()}) == "sd2"
    flux = load_arch("flux").diffusers_param_map("transformer")
    assert detect_arch_from_checkpoint({n: p.shape for (_, n), p in flux.items()}) == "flux"
    sd3 = load_arch("sd3").diffusers_param_map("transformer")
    assert detect_arch_from_checkpoint({n: p.shape for (_, n), p in sd3.items()}) == "sd3"
    sdxl = load_arch("sdxl")
    assert detect_arch_from_checkpoint({k: sdxl.checkpoint_shape(k) for k in sdxl.checkpoint_params}) == "sdxl"
    assert detect_arch_from_checkpoint({"model.layers.0.mlp.up_proj.weight": (11008, 4096)}) == "unknown"
    refiner = {"conditioner.embedders.0.model.ln_final.weight": (1280,),
               "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280)}
    assert detect_arch_from_checkpoint(refiner) == "unknown"
    assert detect_arch_from_checkpoint({"conditioner.embedders.1.model.ln_final.weight": (1280,)}) == "sdxl"


@pytest.mark.parametrize("arch_name", ARCH_NAMES)
def test_tables_are_consistent(arch_name):
    arch = load_arch(arch_name)
    for key, spec in arch.modules.items():
        assert key == spec.key and spec.group in ("attn", "conv", "other", "norm")
        assert len(spec.shape) in ((1,) if spec.group == "norm" else (2, 4)) and spec.kohya.startswith("lora_")
        if not spec.is_fused:
            assert arch.params[(spec.component, spec.path + ".weight")].shape == spec.shape
        assert family(arch.name).from_kohya(spec.kohya) == (spec.fused_in or key)
    for kind in ("attn", "transformer", "transformer+conv", "all"):
        order = [s.key for s in arch.targets(kind)]
        assert len(order) == len(set(order)) and order == [s.key for s in arch.targets(kind)]
    with pytest.raises(LoraToolError, match="unknown target set"):
        arch.targets("convs")
