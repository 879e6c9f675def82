"""Module-name spelling shared by the codecs: kohya ids, SAI/LDM block names, BFL Flux names.

A codec only knows *where* a module's path is written in a key; turning an id such as
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` into the canonical
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` is done here, once, for every codec.
The architecture tables (``loratool.arch``) are asked first; the rules below cover what a table does
not list (T5 encoders, models without a table) so that a file never loses keys to a missing table.
"""

from __future__ import annotations

import re
from functools import lru_cache

# names that themselves contain "_" (kohya ids replace every "." by "_"), longest first at each start
_COMPOUNDS = """
down_blocks up_blocks mid_block transformer_blocks single_transformer_blocks
to_q to_k to_v to_out to_add_out add_q_proj add_k_proj add_v_proj to_qkv to_added_qkv to_qkv_mlp
proj_in proj_out proj_mlp conv_in conv_out conv_shortcut conv_norm_out time_emb_proj time_embedding
linear_1 linear_2 add_embedding text_model self_attn q_proj k_proj v_proj out_proj layer_norm1 layer_norm2
final_layer_norm token_embedding position_embedding text_projection norm1_context ff_context norm_out
x_embedder context_embedder time_text_embed timestep_embedder text_embedder guidance_embedder
norm_q norm_k norm_added_q norm_added_k
input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection time_embed label_emb
double_blocks single_blocks img_attn txt_attn img_mlp txt_mlp img_mod txt_mod img_in txt_in time_in vector_in
guidance_in in_layer out_layer final_layer adaLN_modulation query_norm key_norm
wi_0 wi_1 relative_attention_bias layer_norm joint_blocks context_block x_block pos_embed t_embedder y_embedder
"""
_COMPOUND_SET = frozenset(_COMPOUNDS.split())
_MAX_PARTS = max(c.count("_") + 1 for c in _COMPOUND_SET)


def underscore_to_path(module_id: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    parts = module_id.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for n in range(min(_MAX_PARTS, len(parts) - i), 1, -1):
            cand = "_".join(parts[i:i + n])
            if cand in _COMPOUND_SET:
                out.append(cand)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def path_to_underscore(path: str) -> str:
    return path.replace(".", "_")


# ---------------------------------------------------------------- SD UNets: SAI/LDM <-> diffusers

_RESNET_SAI = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
               "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_RESNET_DIFF = {v: k for k, v in _RESNET_SAI.items()}
_GLOBAL_SAI = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_GLOBAL_DIFF = {v: k for k, v in _GLOBAL_SAI.items()}


def _sub(table: dict[str, str], rest: str) -> str:
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def sai_unet_to_diffusers(path: str, layers_per_block: int = 2) -> str | None:
    """An SD/SDXL UNet path in SAI/LDM block names to diffusers names (None: not an SAI path)."""
    for a, b in _GLOBAL_SAI.items():
        if path == a or path.startswith(a + "."):
            return b + path[len(a):]
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    step = layers_per_block + 1
    if m:
        kind, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) or ""
        if kind == "input_blocks":
            block, layer = divmod(i - 1, step)
            if rest.startswith("op"):
                return _join(f"down_blocks.{block}.downsamplers.0.conv", rest[2:].lstrip("."))
            sub = "resnets" if j == 0 else "attentions"
        else:
            block, layer = divmod(i, step)
            if j > 0 and (rest == "conv" or rest.startswith("conv.")):
                return _join(f"up_blocks.{block}.upsamplers.0.conv", rest[4:].lstrip("."))
            sub = "resnets" if j == 0 else "attentions"
        if sub == "resnets":
            rest = _sub(_RESNET_SAI, rest)
        return _join(f"{'down' if kind == 'input_blocks' else 'up'}_blocks.{block}.{sub}.{layer}", rest)
    m = re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        j, rest = int(m.group(1)), m.group(2) or ""
        if j == 1:
            return _join("mid_block.attentions.0", rest)
        return _join(f"mid_block.resnets.{j // 2}", _sub(_RESNET_SAI, rest))
    return None


def diffusers_unet_to_sai(path: str, layers_per_block: int = 2, upsampler_index: int = 2) -> str:
    """The inverse of :func:`sai_unet_to_diffusers` (SDXL: upsamplers sit at sub-index 2)."""
    for a, b in _GLOBAL_DIFF.items():
        if path == a or path.startswith(a + "."):
            return b + path[len(a):]
    step = layers_per_block + 1
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        side, i, sub, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if sub == "downsamplers":
            return _join(f"input_blocks.{step * (i + 1)}.0.op", rest[4:].lstrip(".") if rest.startswith("conv") else rest)
        if sub == "upsamplers":
            return _join(f"output_blocks.{step * i + layers_per_block}.{upsampler_index}", rest)
        if sub == "resnets":
            rest = _sub(_RESNET_DIFF, rest)
        idx = step * i + j + 1 if side == "down" else step * i + j
        return _join(f"{'input' if side == 'down' else 'output'}_blocks.{idx}.{0 if sub == 'resnets' else 1}", rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        sub, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if sub == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{2 * j}", _sub(_RESNET_DIFF, rest))
    return path


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if b else a


def is_sai_unet_path(path: str) -> bool:
    return path.split(".", 1)[0] in {"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"}


# ---------------------------------------------------------------- Flux: BFL <-> diffusers

_FLUX_DOUBLE = {
    "img_attn.qkv": "attn.to_qkv", "txt_attn.qkv": "attn.to_added_qkv",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
}
_FLUX_SINGLE = {"linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear"}
_FLUX_GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    # rows are [shift, scale] in BFL and [scale, shift] in diffusers: see flux.swap_halves
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
FLUX_SWAPPED = "norm_out.linear"
BFL_ROOTS = {"double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"}


@lru_cache(maxsize=4096)
def bfl_to_diffusers(path: str) -> str | None:
    m = re.match(r"(double|single)_blocks\.(\d+)\.(.*)$", path)
    if m:
        table = _FLUX_DOUBLE if m.group(1) == "double" else _FLUX_SINGLE
        name = table.get(m.group(3))
        block = "transformer_blocks" if m.group(1) == "double" else "single_transformer_blocks"
        return None if name is None else f"{block}.{m.group(2)}.{name}"
    return _FLUX_GLOBAL.get(path)


_DOUBLE_INV = {v: k for k, v in _FLUX_DOUBLE.items()}
_SINGLE_INV = {v: k for k, v in _FLUX_SINGLE.items()}
_GLOBAL_INV = {v: k for k, v in _FLUX_GLOBAL.items() if k != "final_layer.linear"}
_GLOBAL_INV["proj_out"] = "final_layer.linear"


@lru_cache(maxsize=4096)
def diffusers_to_bfl(path: str) -> str | None:
    """A Flux diffusers path in BFL names; None when BFL has no weight of that name (split q/k/v)."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)$", path)
    if m:
        double = m.group(1) == "transformer_blocks"
        name = (_DOUBLE_INV if double else _SINGLE_INV).get(m.group(3))
        return None if name is None else f"{'double' if double else 'single'}_blocks.{m.group(2)}.{name}"
    return _GLOBAL_INV.get(path)


# ---------------------------------------------------------------- text encoders

def text_encoder_path(path: str) -> str:
    """CLIP paths always carry ``text_model.`` (transformers 5 dropped it; we keep one spelling)."""
    head = path.split(".", 1)[0]
    if head in {"encoder", "embeddings", "final_layer_norm"} and not path.startswith("encoder.block."):
        return "text_model." + path
    return path


# peft folders bind to a concrete model's module names, so their CLIP keys follow the model class.
# transformers 5 made CLIPTextModel flat (``encoder.layers.…``) while CLIPTextModelWithProjection keeps
# ``text_model.`` (its ``text_model`` is a flat CLIPTextModel); transformers 4 nests both.
CLIP_LAYOUTS = ("auto", "flat", "nested")
# (base model, component) pairs whose CLIP encoder is a CLIPTextModelWithProjection (always nested)
_WITH_PROJECTION = {("sdxl", "text_encoder_2"), ("sd3", "text_encoder"), ("sd3", "text_encoder_2")}


@lru_cache(maxsize=1)
def installed_clip_is_flat() -> bool | None:
    """Whether the installed transformers' CLIPTextModel has no ``text_model`` level (None: not importable)."""
    try:
        import torch
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
                             vocab_size=4, max_position_embeddings=2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        with torch.device("meta"):
            model = CLIPTextModel(cfg)
    except Exception:  # noqa: BLE001 - any failure means "cannot tell"
        return None
    return not hasattr(model, "text_model")


def peft_text_encoder_path(path: str, base_model: str, component: str, paths: list[str], layout: str = "auto") -> str:
    """A canonical text-encoder path as the model a peft folder is loaded into names it.

    ``layout``: ``flat`` (transformers ≥ 5 CLIPTextModel), ``nested`` (``text_model.``, transformers 4), or
    ``auto``: the installed transformers' layout, and ``flat`` when transformers is not importable (the
    layout of the current transformers release). A CLIPTextModelWithProjection (SDXL's second encoder,
    SD3's CLIP encoders, or any component with ``text_projection``) is nested in every version.
    """
    if layout not in CLIP_LAYOUTS:
        raise ValueError(f"unknown CLIP layout {layout!r} (choose from {', '.join(CLIP_LAYOUTS)})")
    path = text_encoder_path(path)
    if not path.startswith("text_model."):
        return path  # T5 and other encoders: one spelling
    if (base_model, component) in _WITH_PROJECTION or "text_projection" in paths:
        return path
    flat = layout == "flat" or (layout == "auto" and installed_clip_is_flat() is not False)
    return path[len("text_model."):] if flat else path


def is_t5_path(path: str) -> bool:
    return path.startswith(("encoder.block.", "shared", "encoder.final_layer_norm"))
