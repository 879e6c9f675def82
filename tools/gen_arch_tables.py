"""Write the architecture tables in loratool/arch/data/*.json.

Run:  python tools/gen_arch_tables.py [--check-dir ../shared/fixtures/real/keyshapes]

The tables are committed data; nothing here runs when loratool is used. The diffusers/transformers
model classes are built from hand-written configs on the meta device (no weights, no hub) to list every
parameter with its shape in diffusers naming. The single-file names (LDM/SGM for SD1/SD2/SDXL, BFL for
Flux, SAI/ComfyUI MMDiT for SD3, OpenCLIP for the SD2 TE and the SDXL TE2) come from the naming rules
below, one function per family. Each parameter row is

    [name, shape, checkpoint_key, rows, op]

`rows` is null (the whole checkpoint tensor), [start, stop] (a slice of rows of a fused tensor) or a list of
[start, stop] ranges whose concatenation gives the diffusers tensor (a row permutation, e.g. BFL's
final_layer modulation where shift and scale trade places). `op` is null, "conv1x1" (the checkpoint
tensor has two trailing 1-dims: VAE attention) or "T" (the checkpoint tensor is the transpose: OpenCLIP
text_projection).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "loratool" / "arch" / "data"


# ----------------------------------------------------------------------------------------------- models
def _sd_unet(kind: str):
    from diffusers import UNet2DConditionModel

    if kind == "sd1":
        return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    if kind == "sd2":
        return UNet2DConditionModel(
            cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True
        )
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=[1, 2, 10],
        cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def _clip(hidden: int, inter: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        vocab_size=49408,
        projection_dim=projection or hidden,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5xxl():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    )
    return T5EncoderModel(cfg)


def _vae(latent: int):
    from diffusers import AutoencoderKL

    quant = latent == 4
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=latent,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    )


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(guidance_embeds=True)


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
    )


def _state(model, clip: bool) -> tuple[dict[str, tuple], list[tuple[str, tuple]]]:
    """Every saved tensor (name -> shape) and every Linear/Conv2d (path -> weight shape)."""
    keys = set(model.state_dict())
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    names.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in keys})
    mods = [
        (n, tuple(m.weight.shape))
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    if clip:  # transformers 5 keeps text_model. for CLIPTextModel only at state_dict level: normalise
        fix = lambda n: n if n.startswith(("text_model.", "text_projection")) else "text_model." + n  # noqa: E731
        names = {fix(n): s for n, s in names.items()}
        mods = [(fix(n), s) for n, s in mods]
    names.pop("encoder.embed_tokens.weight", None)  # T5: tied to shared.weight
    return names, mods


# ------------------------------------------------------------------------------------- naming rules
_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_ldm(name: str, up_has_attn: list[bool]) -> str:
    """diffusers UNet2DConditionModel parameter name -> LDM/SGM name (without model.diffusion_model.)."""
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    mod, _, leaf = name.rpartition(".")
    if mod in fixed:
        return f"{fixed[mod]}.{leaf}"

    def resnet(rest: str) -> str:
        sub, _, tail = rest.partition(".")
        return f"{_RESNET_LDM[sub]}.{tail}"

    if m := re.match(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 3 * i + j + 1
        return f"input_blocks.{n}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 3 * i + j
        return f"output_blocks.{n}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.+)", name):
        i = int(m[1])
        return f"output_blocks.{3 * i + 2}.{2 if up_has_attn[i] else 1}.conv.{m[2]}"
    raise KeyError(name)


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


# ------------------------------------------------------------------------------------------ assembly
def _unet_group(path: str) -> str:
    if ".attentions." in path:
        return "attn"
    if ".resnets." in path or "samplers." in path:
        return "conv"
    return "other"


def _te_group(path: str) -> str:
    return "attn" if re.search(r"\.(self_attn|mlp|SelfAttention|DenseReluDense)\.", path) else "other"


def _sd_block(ldm: str, last_out: int) -> str:
    if m := re.match(r"input_blocks\.(\d+)\.", ldm):
        return f"IN{int(m[1]):02d}"
    if ldm.startswith("middle_block."):
        return "MID"
    if m := re.match(r"output_blocks\.(\d+)\.", ldm):
        return f"OUT{int(m[1]):02d}"
    if ldm.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if ldm.startswith("out."):
        return f"OUT{last_out:02d}"
    raise KeyError(ldm)


def _dit_block(ckey: str) -> str:
    for pat, fmt in ((r"double_blocks\.(\d+)\.", "D{:02d}"), (r"single_blocks\.(\d+)\.", "S{:02d}"),
                     (r"joint_blocks\.(\d+)\.", "J{:02d}")):
        if m := re.match(pat, ckey):
            return fmt.format(int(m[1]))
    return "OUT" if ckey.startswith("final_layer.") else "IN"


def _component(model, clip, ckpt_prefix, namer, kohya_prefix, group, block, kohya_names, cmod=None):
    """One component's rows: params [name, shape, ckey, rows, op] and modules [path, group, block, kohya]."""
    names, mods = _state(model, clip)
    params = []
    for name, shape in names.items():
        ckey, rows, op = namer(name)
        params.append([name, list(shape), ckey, rows, op])
    cmap = {p[0]: p for p in params}
    modules = []
    for path, _shape in mods if kohya_prefix else []:
        ckey = cmap[path + ".weight"][2]
        cpath = ckey.removesuffix(".weight")
        kid = path if kohya_names == "diffusers" else cpath
        modules.append([path, group(path), block(cpath), kid.replace(".", "_")])
    return {"checkpoint_prefix": ckpt_prefix, "kohya_prefix": kohya_prefix,
            "params": params, "modules": modules}


def _plain(name):
    return name, None, None


def _with_op(fn):
    def namer(name):
        out, op = fn(name)
        return out, None, op
    return namer


def build_sd(kind: str) -> dict:
    unet = _sd_unet(kind)
    up_attn = [hasattr(b, "attentions") for b in unet.up_blocks]
    last_out = 3 * len(unet.up_blocks) - 1
    comps = {}
    comps["unet"] = _component(
        unet, False, "model.diffusion_model.", lambda n: (unet_ldm(n, up_attn), None, None), "lora_unet",
        _unet_group, lambda c: _sd_block(c, last_out), "checkpoint" if kind == "sdxl" else "diffusers")
    te_block = lambda c: "BASE"  # noqa: E731
    if kind == "sd1":
        comps["text_encoder"] = _component(_clip(768, 3072, 12, 12), True, "cond_stage_model.transformer.",
                                           _plain, "lora_te", _te_group, te_block, "diffusers")
    elif kind == "sd2":
        comps["text_encoder"] = _component(_clip(1024, 4096, 23, 16), True, "cond_stage_model.model.",
                                           lambda n: openclip(n, 1024), "lora_te", _te_group, te_block,
                                           "diffusers")
    else:
        comps["text_encoder"] = _component(_clip(768, 3072, 12, 12), True, "conditioner.embedders.0.transformer.",
                                           _plain, "lora_te1", _te_group, te_block, "diffusers")
        comps["text_encoder_2"] = _component(_clip(1280, 5120, 32, 20, projection=1280), True,
                                             "conditioner.embedders.1.model.", lambda n: openclip(n, 1280),
                                             "lora_te2", _te_group, te_block, "diffusers")
    comps["vae"] = _component(_vae(4), False, "first_stage_model.", _with_op(vae_ldm), None,
                              lambda p: "other", lambda c: None, "diffusers")
    return comps


def build_flux() -> dict:
    comps = {
        "transformer": _component(_flux(), False, "model.diffusion_model.", flux_bfl, "lora_unet",
                                  lambda p: "attn" if "transformer_blocks." in p else "other",
                                  _dit_block, "checkpoint"),
        "text_encoder": _component(_clip(768, 3072, 12, 12), True, "text_encoders.clip_l.transformer.", _plain,
                                   "lora_te1", _te_group, lambda c: "CLIP", "diffusers"),
        "text_encoder_2": _component(_t5xxl(), False, "text_encoders.t5xxl.transformer.", _plain, "lora_te3",
                                     _te_group, lambda c: "T5", "diffusers"),
        "vae": _component(_vae(16), False, "vae.", _with_op(vae_ldm), None, lambda p: "other",
                          lambda c: None, "diffusers"),
    }
    return comps


def build_sd3() -> dict:
    base = lambda c: "BASE"  # noqa: E731
    return {
        "transformer": _component(_sd3(), False, "model.diffusion_model.", sd3_mmdit, "lora_unet",
                                  lambda p: "attn" if "transformer_blocks." in p else "other",
                                  _dit_block, "checkpoint"),
        "text_encoder": _component(_clip(768, 3072, 12, 12, projection=768), True,
                                   "text_encoders.clip_l.transformer.", _plain, "lora_te1", _te_group, base,
                                   "diffusers"),
        "text_encoder_2": _component(_clip(1280, 5120, 32, 20, projection=1280), True,
                                     "text_encoders.clip_g.transformer.", _plain, "lora_te2", _te_group, base,
                                     "diffusers"),
        "text_encoder_3": _component(_t5xxl(), False, "text_encoders.t5xxl.transformer.", _plain, "lora_te3",
                                     _te_group, base, "diffusers"),
        "vae": _component(_vae(16), False, "first_stage_model.", _with_op(vae_ldm), None, lambda p: "other",
                          lambda c: None, "diffusers"),
    }


def add_fused(comps: dict) -> dict:
    """Pseudo-modules for fused single-file weights of a DiT (BFL qkv/linear1, MMDiT qkv)."""
    fused: dict[str, dict] = {}
    tr = comps["transformer"]
    by_ckey: dict[str, list] = {}
    for name, _shape, ckey, rows, _op in tr["params"]:
        if name.endswith(".weight") and rows and isinstance(rows[0], int):
            by_ckey.setdefault(ckey, []).append((name.removesuffix(".weight"), rows))
    mods = {m[0]: m for m in tr["modules"]}
    for ckey, parts in by_ckey.items():
        first = parts[0][0]
        block = first.rsplit(".attn.", 1)[0]
        leaves = {p.rsplit(".", 1)[-1] for p, _ in parts}
        if "proj_mlp" in leaves:
            path = f"{block}.to_qkv_mlp"
        elif "add_q_proj" in leaves:
            path = f"{block}.attn.to_added_qkv"
        else:
            path = f"{block}.attn.to_qkv"
        stop = max(r[1] for _, r in parts)
        width = next(s for n, s, *_ in tr["params"] if n == first + ".weight")[1]
        m = mods[first]
        fused[f"transformer.{path}"] = {
            "shape": [stop, width], "checkpoint_key": ckey, "group": m[1], "block": m[2], "kohya": m[3],
            "parts": [[f"transformer.{p}", r[0], r[1]] for p, r in parts],
        }
    return fused


_SCHED = r"^(betas|alphas_cumprod|alphas_cumprod_prev|log_one_minus_alphas_cumprod|posterior_\w+|sqrt_\w+)$"
EXTRA = {
    "sd1": [_SCHED, r"^model_ema\.", r"\.position_ids$"],
    "sd2": [_SCHED, r"^model_ema\.", r"^cond_stage_model\.model\.transformer\.resblocks\.23\.",
            r"^cond_stage_model\.model\.(text_projection|logit_scale)$"],
    "sdxl": [_SCHED, r"\.position_ids$", r"^conditioner\.embedders\.1\.model\.logit_scale$",
             r"^(edm_vpred\.sigma_max|edm_vpred\.sigma_min|v_pred|ztsnr)$"],
    "flux": [r"\.position_ids$"],
    "sd3": [r"\.position_ids$", r"^text_encoders\.\w+\.logit_scale$", r"^model\.model_sampling\.sigmas$"],
}

_SD1_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(3, 12)]
# the named 17-slot presets of the LoRA Block Weight extension (also used by supermerger)
_SD1_PRESETS = {
    "NONE": [0] * 17, "ALL": [1] * 17,
    "INS": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "IND": [1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "INALL": [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "MIDD": [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTD": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTS": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "OUTALL": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "ALL0.5": [0.5] * 17,
}


def lbw_table(kind: str) -> dict:
    if kind in ("sd1", "sd2"):
        slots = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]
        return {"slots": slots, "vectors": {"17": _SD1_17, "26": slots}, "presets": {"17": _SD1_PRESETS}}
    if kind == "sdxl":
        slots = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["MID"] + [f"OUT{i:02d}" for i in range(9)]
        v12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(6)]
        return {"slots": slots, "vectors": {"12": v12, "20": slots}, "presets": {}}
    if kind == "flux":
        slots = ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]
        return {"slots": slots, "vectors": {"61": slots}, "presets": {}}
    slots = ["BASE", "IN"] + [f"J{i:02d}" for i in range(24)] + ["OUT"]
    return {"slots": slots, "vectors": {str(len(slots)): slots}, "presets": {}}


def build(kind: str) -> dict:
    with torch.device("meta"):
        comps = build_flux() if kind == "flux" else build_sd3() if kind == "sd3" else build_sd(kind)
    fused = add_fused(comps) if kind in ("flux", "sd3") else {}
    return {"name": kind, "components": [c for c in comps if c != "vae"], "tables": comps,
            "fused": fused, "checkpoint_extra": EXTRA[kind], "lbw": lbw_table(kind)}


def dump(obj, indent: int = 0) -> str:
    """JSON with one table row per line: small diffs, still compact."""
    pad = " " * indent
    if isinstance(obj, dict) and indent < 6:
        items = [f'{pad}  {json.dumps(k)}: {dump(v, indent + 2).lstrip()}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" if items else "{}"
    if isinstance(obj, list) and obj and isinstance(obj[0], list):
        rows = [f"{pad}  {json.dumps(r, separators=(',', ':'))}" for r in obj]
        return "[\n" + ",\n".join(rows) + f"\n{pad}]"
    return json.dumps(obj, separators=(",", ":"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="*", default=["sd1", "sd2", "sdxl", "flux", "sd3"])
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for kind in args.archs:
        text = dump(build(kind)) + "\n"
        (OUT / f"{kind}.json").write_text(text)
        print(f"{kind}: {len(text) / 1e3:.0f} kB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
