"""Where extract finds each module's weight, on key/shape tables alone (no tensors)."""

from __future__ import annotations

import torch

from loratool.io.weights import Segment
from loratool.ops.extract_plan import ExtractOptions, build_plan


class KeysOnly:
    """The part of a TensorSource the planner uses."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.files = shapes
        self.path = "stub.safetensors"

    def keys(self):
        return list(self.files)

    def __contains__(self, key):
        return key in self.files

    def shapes(self):
        return dict(self.files)

    def shape(self, key):
        return self.files[key]

    def dtype(self, key):
        return torch.bfloat16

    def dtype_name(self, key):
        return "BF16"


def test_flux_bare_bfl_keys_read_fused_weights_whole():
    shapes = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "double_blocks.0.img_attn.proj.weight": (3072, 3072),
              "single_blocks.0.linear1.weight": (21504, 3072), "single_blocks.0.linear2.weight": (3072, 15360)}
    src = KeysOnly(shapes)
    plan = build_plan(src, src, ExtractOptions(rank=16))
    assert plan.arch == "flux"
    got = {m.key: (m.shape, m.ref.segments) for m in plan.modules}
    assert got["transformer.transformer_blocks.0.attn.to_qkv"] == (
        (9216, 3072), (Segment("double_blocks.0.img_attn.qkv.weight"),))
    assert got["transformer.single_transformer_blocks.0.to_qkv_mlp"][0] == (21504, 3072)
    assert len(plan.modules) == 4


def test_flux_diffusers_parts_are_stacked_into_the_fused_module():
    p = "transformer_blocks.0.attn."
    shapes = {p + "to_q.weight": (3072, 3072), p + "to_k.weight": (3072, 3072), p + "to_v.weight": (3072, 3072),
              "single_transformer_blocks.0.proj_out.weight": (3072, 15360)}
    src = KeysOnly(shapes)
    plan = build_plan(src, src, ExtractOptions(rank=16, arch="flux"))
    fused = {m.key: m for m in plan.modules}["transformer.transformer_blocks.0.attn.to_qkv"]
    assert [s.key for s in fused.ref.segments] == [p + "to_q.weight", p + "to_k.weight", p + "to_v.weight"]
    assert fused.shape == (9216, 3072)


def test_conv_rank_and_caps_follow_the_shape():
    shapes = {"model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
              "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": (320, 1280),
              "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768)}
    src = KeysOnly(shapes)
    plan = build_plan(src, src, ExtractOptions(rank=512, conv_rank=8, targets="attn+conv"))
    ranks = {m.key.rsplit(".", 1)[-1]: m.rank for m in plan.modules}
    assert ranks == {"conv1": 8, "time_emb_proj": 320, "q_proj": 512}
