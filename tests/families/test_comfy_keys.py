"""What ComfyUI loads: its LoRA key map built by ComfyUI's published rules (``comfy/lora.py::model_lora_keys_unet``
as reference/families.md §0 and the per-family branches give them), and every module name our kohya (the web-UI
default) and bfl outputs write must be a key of it; names ComfyUI is known not to load are not.

The rules: for every model weight ``diffusion_model.<X>.weight`` (``X`` in ComfyUI's internal names: the single-file
names for Wan, Flux, Chroma, SD3, LTX-Video, Lumina 2 and Z-Image, diffusers' for Qwen-Image and HiDream, Flux-style
renames of the Tencent names for HunyuanVideo) it accepts ``diffusion_model.<X>`` and ``lora_unet_<X, . -> _>``;
branches add ``transformer.<Tencent name>`` / ``diffusion_model.<Tencent name>`` (HunyuanVideo), ``transformer.<X>``
and ``lycoris_<X_>`` (HiDream, Qwen-Image, which also takes bare ``<X>``), and ``transformer.``/``lycoris_``/
``lora_transformer_`` diffusers names (Flux and Chroma, ``class Chroma(Flux)``; SD3 also ``base_model.model.``).
"""

from __future__ import annotations

import pytest
import torch

from loratool.arch import family
from loratool.core.modules import Adapter, LoraModule
from loratool.formats import encode
from loratool.ops.convert import convert

# ComfyUI's supported_models.HunyuanVideo.process_unet_state_dict: checkpoint (Tencent) names -> its own
HUNYUAN_TO_COMFY = [("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
                    ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
                    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
                    ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."), ("_mod.linear.", "_mod.lin."),
                    ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
                    ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
                    ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer.")]
BRANCH = {"hunyuan-video": "tencent", "hidream": "x", "qwen-image": "x", "chroma": "diffusers",
          "flux-kontext": "diffusers", "sd3": "diffusers"}


def _internal(fam_name: str, checkpoint_name: str) -> str:
    if fam_name != "hunyuan-video":
        return checkpoint_name
    key = checkpoint_name + "."
    for a, b in HUNYUAN_TO_COMFY:
        key = key.replace(a, b)
    return key[:-1]


def comfy_key_map(fam_name: str) -> set[str]:
    """The LoRA module names ComfyUI maps onto a model of this family (its rules, the weights of our table)."""
    table = family(fam_name).table
    prefix = table.checkpoint_prefix["transformer"]
    names = {k[len(prefix):].removesuffix(".weight") for k in table.checkpoint_params if k.startswith(prefix)}
    xs = {_internal(fam_name, n) for n in names}
    keys = {f"diffusion_model.{x}" for x in xs} | {f"lora_unet_{x.replace('.', '_')}" for x in xs}
    branch = BRANCH.get(fam_name)
    if branch == "tencent":
        keys |= {f"{p}.{n}" for n in names for p in ("transformer", "diffusion_model")}
    elif branch == "x":
        keys |= {f"transformer.{x}" for x in xs} | {f"lycoris_{x.replace('.', '_')}" for x in xs}
        if fam_name == "qwen-image":
            keys |= xs
    elif branch == "diffusers":
        split = {s.path for s in table.modules.values() if s.component == "transformer" and not s.is_fused}
        keys |= {f"transformer.{d}" for d in split} | {f"lycoris_{d.replace('.', '_')}" for d in split}
        keys |= {f"lora_transformer_{d.replace('.', '_')}" for d in split}
        if fam_name == "sd3":
            keys |= {f"base_model.model.{d}" for d in split}
    return keys


def _every_module(fam_name: str) -> Adapter:
    """A rank-1 LoRA on every adaptable weight of the family's table (its own sizes), as parts where fused."""
    fam = family(fam_name)
    a = Adapter(base_model=fam_name)
    g = torch.Generator().manual_seed(0)
    for spec in fam.table.targets("all", fused=False, components=("transformer",)):
        if len(spec.shape) == 2:
            a.add(LoraModule("transformer", spec.path, alpha=1.0, down=torch.randn(1, spec.shape[1], generator=g),
                             up=torch.zeros(spec.shape[0], 1)))
    return a


def _stems(a: Adapter, layout: str) -> set[str]:
    converted, _ = convert(a, layout)
    tensors, _ = encode(converted, layout)
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}


FAMILIES = ["wan", "hunyuan-video", "qwen-image", "z-image", "lumina2", "chroma", "flux-kontext", "hidream", "sd3",
            "ltx-video"]


@pytest.mark.parametrize("fam_name", FAMILIES)
def test_kohya_output_is_what_comfyui_maps(fam_name):
    """``--to kohya`` (webui/comfyui) writes, for every module of every new family, a name ComfyUI maps."""
    keys = comfy_key_map(fam_name)
    stems = _stems(_every_module(fam_name), "kohya")
    assert stems and stems <= keys, sorted(stems - keys)[:5]


@pytest.mark.parametrize("fam_name", FAMILIES)
def test_bfl_output_is_what_comfyui_maps(fam_name):
    keys = comfy_key_map(fam_name)
    stems = _stems(_every_module(fam_name), "bfl")
    assert stems and stems <= keys, sorted(stems - keys)[:5]


@pytest.mark.parametrize("fam_name,layout,example", [
    ("wan", "diffusers", "transformer.blocks.0.attn1.to_q"),  # the issue: diffusers-format Wan LoRAs do not load
    ("hunyuan-video", "musubi", "lora_unet_double_blocks_0_img_mlp_fc1"),  # musubi #26: loads only partly
    ("z-image", "musubi", "lora_unet_layers_0_attention_to_q"),  # ComfyUI #11487
    ("ltx-video", "diffusers", "transformer.transformer_blocks.0.attn1.to_q"),  # finetrainers #133
])
def test_layouts_comfyui_does_not_load(fam_name, layout, example):
    """The layouts the reference reports ComfyUI ignoring are indeed outside its key map (so --to kohya, not these,
    is what we offer for ComfyUI)."""
    keys = comfy_key_map(fam_name)
    stems = _stems(_every_module(fam_name), layout)
    assert example in stems and example not in keys
