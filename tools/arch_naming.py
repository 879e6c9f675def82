"""Single-file <-> diffusers naming rules, one function per family (used by gen_arch_tables.py).

Each function takes a diffusers parameter name and returns (checkpoint name without prefix, rows, op), with
rows and op as gen_arch_tables.py describes. The UNet block numbering is the runtime's own rule
(loratool/arch/families/ldm_unet.py), so that the tables and the fallback for untabled UNets cannot differ. The rules were written from the published layouts (LDM/SGM
UNet and VAE, OpenCLIP, BFL Flux, SAI MMDiT); tests/unit/test_arch_diffusers_crosscheck.py compares the
resulting tables with diffusers' own single-file converters.
"""

from __future__ import annotations

import re

from loratool.arch.families.ldm_unet import diffusers_to_original


def unet_ldm(name: str, up_has_attn: list[bool]) -> str:
    """diffusers UNet2DConditionModel parameter name -> LDM/SGM name (without model.diffusion_model.): the
    runtime rule (loratool.arch.families.ldm_unet) on the module path, the parameter's leaf kept."""
    module, _, leaf = name.rpartition(".")
    original = diffusers_to_original(module, up_has_attn=up_has_attn)
    if original == module:
        raise KeyError(name)
    return f"{original}.{leaf}"


def vae_ldm(name: str) -> tuple[str, str | None]:
    """diffusers AutoencoderKL name -> LDM VAE name (without prefix), op."""
    subs = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d)\.resnets\.(\d)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"decoder.up.{3 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.conv\.", lambda m: f"decoder.up.{3 - int(m[1])}.upsample.conv."),
    ]
    out = name
    for pat, rep in subs:
        out = re.sub(pat, rep, out)
    out = out.replace(".conv_shortcut.", ".nin_shortcut.")
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)$", name):
        part = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
        op = "conv1x1" if m[3] == "weight" and part != "norm" else None
        return f"{m[1]}.mid.attn_1.{part}.{m[3]}", op
    return out, None


def openclip(name: str, width: int) -> tuple[str, list[int] | None, str | None]:
    """HF CLIP name (with text_model.) -> OpenCLIP name, rows of a fused in_proj, op."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    if name in fixed:
        return fixed[name], None, None
    if name == "text_projection.weight":
        return "text_projection", None, "T"
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if not m:
        raise KeyError(name)
    layer, mod, leaf = m[1], m[2], m[3]
    base = f"transformer.resblocks.{layer}."
    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if mod in qkv:
        k = qkv[mod]
        return f"{base}attn.in_proj_{leaf}", [k * width, (k + 1) * width], None
    sub = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
           "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[mod]
    return f"{base}{sub}.{leaf}", None, None


def _swap(n: int) -> list[list[int]]:
    """Rows of a modulation whose two halves (shift, scale) trade places between the layouts."""
    return [[n, 2 * n], [0, n]]


def flux_bfl(name: str, hidden: int = 3072, mlp: int = 12288):
    """diffusers FluxTransformer2DModel name -> BFL name, rows, op."""
    fixed = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}
    mod, _, leaf = name.rpartition(".")
    if mod in fixed:
        return f"{fixed[mod]}.{leaf}", None, None
    if mod == "norm_out.linear":
        return f"final_layer.adaLN_modulation.1.{leaf}", _swap(hidden), None
    if m := re.match(r"transformer_blocks\.(\d+)\.(.+)$", mod):
        b, sub = f"double_blocks.{m[1]}.", m[2]
        qkv = {"attn.to_q": ("img", 0), "attn.to_k": ("img", 1), "attn.to_v": ("img", 2),
               "attn.add_q_proj": ("txt", 0), "attn.add_k_proj": ("txt", 1), "attn.add_v_proj": ("txt", 2)}
        if sub in qkv:
            side, k = qkv[sub]
            return f"{b}{side}_attn.qkv.{leaf}", [k * hidden, (k + 1) * hidden], None
        one = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
               "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
               "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
               "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm",
               "attn.norm_added_k": "txt_attn.norm.key_norm"}[sub]
        if one.endswith("_norm"):
            leaf = "scale"
        return f"{b}{one}.{leaf}", None, None
    if m := re.match(r"single_transformer_blocks\.(\d+)\.(.+)$", mod):
        b, sub = f"single_blocks.{m[1]}.", m[2]
        parts = {"attn.to_q": (0, hidden), "attn.to_k": (hidden, 2 * hidden),
                 "attn.to_v": (2 * hidden, 3 * hidden), "proj_mlp": (3 * hidden, 3 * hidden + mlp)}
        if sub in parts:
            return f"{b}linear1.{leaf}", list(parts[sub]), None
        one = {"norm.linear": "modulation.lin", "proj_out": "linear2",
               "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}[sub]
        if one.endswith("_norm"):
            leaf = "scale"
        return f"{b}{one}.{leaf}", None, None
    raise KeyError(name)


def sd3_mmdit(name: str, hidden: int = 1536, last: int = 23):
    """diffusers SD3Transformer2DModel name -> SAI/ComfyUI MMDiT name, rows, op."""
    fixed = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
             "proj_out": "final_layer.linear",
             "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
    if name == "pos_embed.pos_embed":
        return "pos_embed", None, None
    mod, _, leaf = name.rpartition(".")
    if mod in fixed:
        return f"{fixed[mod]}.{leaf}", None, None
    if mod == "norm_out.linear":
        return f"final_layer.adaLN_modulation.1.{leaf}", _swap(hidden), None
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", mod)
    if not m:
        raise KeyError(name)
    b, sub = f"joint_blocks.{m[1]}.", m[2]
    qkv = {"attn.to_q": ("x_block", 0), "attn.to_k": ("x_block", 1), "attn.to_v": ("x_block", 2),
           "attn.add_q_proj": ("context_block", 0), "attn.add_k_proj": ("context_block", 1),
           "attn.add_v_proj": ("context_block", 2)}
    if sub in qkv:
        side, k = qkv[sub]
        return f"{b}{side}.attn.qkv.{leaf}", [k * hidden, (k + 1) * hidden], None
    if sub == "norm1_context.linear" and int(m[1]) == last:  # pre-only context block: AdaLayerNormContinuous
        return f"{b}context_block.adaLN_modulation.1.{leaf}", _swap(hidden), None
    one = {"norm1.linear": "x_block.adaLN_modulation.1",
           "norm1_context.linear": "context_block.adaLN_modulation.1",
           "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
           "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
           "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}[sub]
    return f"{b}{one}.{leaf}", None, None
