"""A family described by rules (blocks x count, renames, fused row offsets as multiples of the hidden size)
gives the same table as the enumerated one: Flux's transformer written as rules reproduces every module of the
generated table, with its shape, single-file key and rows, kohya id, LBW block and fused group. This is the
form the next families (Wan, Qwen-Image, HunyuanVideo, …) take, sized from a file's shapes."""

from __future__ import annotations

import pytest

from loratool.arch import Family, load_arch
from loratool.arch.rules import build_table, dim, infer_sizes
from loratool.errors import LoraToolError

H_ROWS = {"q": [0, "H"], "k": ["H", "2*H"], "v": ["2*H", "3*H"]}
FLUX_RULES = {
    "sizes": {"H": 3072, "M": 12288, "D": 19, "S": 38},
    "infer": {"H": ["transformer.transformer_blocks.{i}.attn.to_out.0", 0],
              "D": ["transformer.transformer_blocks.{i}"], "S": ["transformer.single_transformer_blocks.{i}"]},
    "components": {"transformer": {
        "checkpoint_prefix": "model.diffusion_model.", "kohya_prefix": "lora_unet",
        "groups": [
            {"block": "IN", "group": "other", "linears": [
                ["time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", ["H", 256]],
                ["time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", ["H", "H"]],
                ["time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", ["H", 256]],
                ["time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", ["H", "H"]],
                ["time_text_embed.text_embedder.linear_1", "vector_in.in_layer", ["H", 768]],
                ["time_text_embed.text_embedder.linear_2", "vector_in.out_layer", ["H", "H"]],
                ["context_embedder", "txt_in", ["H", 4096]], ["x_embedder", "img_in", ["H", 64]]]},
            {"count": "D", "diffusers": "transformer_blocks.{i}", "original": "double_blocks.{i}",
             "block": "D{i:02d}", "group": "attn",
             "fused": {"img_attn.qkv": "attn.to_qkv", "txt_attn.qkv": "attn.to_added_qkv"},
             "linears": [
                ["norm1.linear", "img_mod.lin", ["6*H", "H"]], ["norm1_context.linear", "txt_mod.lin", ["6*H", "H"]],
                *[[f"attn.to_{x}", "img_attn.qkv", ["H", "H"], rows] for x, rows in H_ROWS.items()],
                ["attn.to_out.0", "img_attn.proj", ["H", "H"]],
                *[[f"attn.add_{x}_proj", "txt_attn.qkv", ["H", "H"], rows] for x, rows in H_ROWS.items()],
                ["attn.to_add_out", "txt_attn.proj", ["H", "H"]],
                ["ff.net.0.proj", "img_mlp.0", ["M", "H"]], ["ff.net.2", "img_mlp.2", ["H", "M"]],
                ["ff_context.net.0.proj", "txt_mlp.0", ["M", "H"]], ["ff_context.net.2", "txt_mlp.2", ["H", "M"]]]},
            {"count": "S", "diffusers": "single_transformer_blocks.{i}", "original": "single_blocks.{i}",
             "block": "S{i:02d}", "group": "attn", "fused": {"linear1": "to_qkv_mlp"},
             "linears": [
                ["norm.linear", "modulation.lin", ["3*H", "H"]],
                ["proj_mlp", "linear1", ["M", "H"], ["3*H", "3*H+M"]],
                ["proj_out", "linear2", ["H", "H+M"]],
                *[[f"attn.to_{x}", "linear1", ["H", "H"], rows] for x, rows in H_ROWS.items()]]},
            {"block": "OUT", "group": "other", "linears": [
                ["norm_out.linear", "final_layer.adaLN_modulation.1", ["2*H", "H"], [["H", "2*H"], [0, "H"]]],
                ["proj_out", "final_layer.linear", [64, "H"]]]},
        ]}},
}


def _specs(arch, component):
    fields = ("shape", "group", "block", "kohya", "checkpoint_key", "checkpoint_rows", "row_order", "fused_in",
              "parts")
    return {k: tuple(getattr(s, f) for f in fields) for k, s in arch.modules.items() if s.component == component}


def test_flux_by_rules_is_the_generated_table():
    table = load_arch("flux")
    ruled = Family({"name": "flux-rules", "rules": FLUX_RULES}).table
    assert _specs(ruled, "transformer") == _specs(table, "transformer")
    assert {k: v for k, v in table.fused.items()} == ruled.fused
    assert ruled.checkpoint_map == {k: v for k, v in table.checkpoint_map.items() if k.startswith("model.")}


def test_sizes_come_from_the_file():
    dims = {"transformer.transformer_blocks.0.attn.to_out.0": (64, 64),
            "transformer.transformer_blocks.1.attn.to_q": (64, 64),
            "transformer.single_transformer_blocks.2.proj_out": (64, 320)}
    sizes = infer_sizes(FLUX_RULES, dims)
    assert sizes == {"H": 64, "D": 2, "S": 3}
    fam = Family({"name": "flux-rules", "rules": FLUX_RULES, "kohya_names": "original"})
    assert fam.resolve("kohya", "lora_unet", "double_blocks_1_txt_attn_qkv").path == "transformer_blocks.1.attn.to_added_qkv"
    assert fam.sized(dims).shape("transformer.transformer_blocks.1.attn.to_q") == (64, 64)
    assert fam.shape("transformer.transformer_blocks.1.attn.to_q") == (3072, 3072)
    small = build_table("tiny", FLUX_RULES, {**sizes, "M": 256})
    paths = {p[0] for p in small["tables"]["transformer"]["modules"]}
    assert "single_transformer_blocks.2.proj_mlp" in paths and "transformer_blocks.2.attn.to_q" not in paths
    fused = small["fused"]["transformer.single_transformer_blocks.0.to_qkv_mlp"]
    assert fused["shape"] == [3 * 64 + 256, 64] and fused["parts"][-1][1:] == [192, 448]


def test_dimension_expressions():
    sizes = {"H": 3, "M": 5}
    assert [dim(v, sizes) for v in (7, "H", "4*H", "3*H+M", "H+64")] == [7, 3, 12, 14, 67]
    assert dim("M/2", sizes) == 2 and dim("M//2-1", sizes) == 1  # "/" divides whole numbers


@pytest.mark.parametrize("expr", ["H**2", "__import__('os')", "H.real", "1.5", "H[0]", "(lambda: 1)()", "H if M else 1"])
def test_dimension_expressions_hold_only_arithmetic(expr):
    with pytest.raises(LoraToolError, match="cannot read the size"):
        dim(expr, {"H": 3, "M": 5})


def test_dimension_expression_with_an_unknown_size_names_it():
    with pytest.raises(LoraToolError, match="unknown size 'W'"):
        dim("4*W", {"H": 3})
