"""Architecture tables: what SD1, SD2, SDXL, Flux and SD3 contain, as data.

    from loratool.arch import load_arch, ARCH_NAMES, lbw_weights, detect_arch_from_checkpoint
    arch = load_arch("sdxl")                 # cached; LoraToolError for an unknown name

Arch attributes (see table.py):
- name, components (unet/transformer + text encoders; the vae is in all_components and the param map only)
- modules: {"component.path": ModuleSpec}: every Linear/Conv2d weight of the unet/transformer and every
  Linear of the text encoders (VAE layers are not targets). ModuleSpec: component, path (diffusers naming,
  CLIP paths always with text_model.), shape, group (attn|conv|other), block (LBW), kohya (module id as
  sd-scripts writes it), checkpoint_key, checkpoint_rows, plus row_order (a row permutation: BFL/MMDiT
  final_layer modulation halves swap), fused_in (the fused pseudo-module a part lives in) and parts.
- fused: {fused key: [(part key, (start, stop))]}. Flux: transformer_blocks.N.attn.to_qkv (BFL img qkv),
  .attn.to_added_qkv (txt qkv), single_transformer_blocks.N.to_qkv_mlp (linear1); SD3: to_qkv and
  to_added_qkv of each joint block. Fused modules and their parts are both in `modules`; a part's kohya
  id is the fused module's (kohya never splits them); from_kohya returns the fused key.
- targets(kind, fused=True, components=None): kind attn | attn+conv | all; fused=True gives kohya's
  granularity (fused modules instead of parts), fused=False diffusers' (parts instead of fused modules).
- from_kohya(id) -> key | None: accepts kohya's ids, lora_teN_ numbered as diffusers numbers TEs (OneTrainer:
  flux T5 as lora_te2_), diffusers block names and SAI block names for every
  unet, TE ids with or without text_model_, and lora_transformer_<diffusers path> for DiTs.
  to_kohya(key) -> id.
- checkpoint_map: {single-file key: [(module key, rows)]} for targetable weights (a fused key first with
  rows None, then its parts with their rows).
- diffusers_param_map(component=None): {(component, name): ParamSpec} for every tensor (biases, norms,
  embeddings, VAE); checkpoint_params is the reverse ({single-file key: [ParamSpec]});
  checkpoint_shape(key); is_checkpoint_extra(key) for known keys without a diffusers counterpart
  (scheduler buffers, EMA, position_ids, SD2's unused 24th OpenCLIP layer, ...).
  loratool.arch.convert.checkpoint_to_diffusers / diffusers_to_checkpoint move the tensors.
- lbw: slots, vector subsets, presets; lbw_weights(arch_name, spec) parses a vector or preset.

Single-file naming used by the tables: sd1 LDM (model.diffusion_model., cond_stage_model.transformer.,
first_stage_model.); sd2 LDM with OpenCLIP-H (cond_stage_model.model.); sdxl SGM (conditioner.embedders.0
/.1); flux and sd3 as ComfyUI saves whole checkpoints (model.diffusion_model., text_encoders.clip_l/
clip_g/t5xxl.transformer., vae. for flux, first_stage_model. for sd3). Files holding one component
without a prefix (the bare BFL flux1-dev.safetensors) match after removing checkpoint_prefix[component].

LBW blocks: BASE for every SD-family text encoder; IN00-IN11/MID/OUT00-OUT11 (sd1/sd2) and IN00-IN08/MID/
OUT00-OUT08 (sdxl) by SAI block index, with time/label embeddings in IN00 and conv_norm_out/conv_out in
the last OUT block; flux CLIP, T5, IN (embedders), D00-D18, S00-S37, OUT (final layer) as the LBW
extension names them; sd3 BASE, IN, J00-J23, OUT. Kohya prefixes: flux CLIP-L lora_te1, T5 lora_te3
(sd-scripts' choice); sd3 lora_te1/2/3.

SD2's text encoder is the 23-layer HF CLIP that diffusers and kohya use (OpenCLIP-H has 24 layers; SD2
uses the penultimate one, so resblocks.23 of a real checkpoint is unused and listed as extra): 138 modules.
The generic notion (unknown models) has no table: callers keep module names as they are.
"""

from __future__ import annotations

from functools import cache

from loratool.arch.detect import detect_arch_from_checkpoint
from loratool.arch.lbw import lbw_presets, lbw_slots, lbw_weights
from loratool.arch.table import Arch, ModuleSpec, ParamSpec, read_table
from loratool.errors import LoraToolError

ARCH_NAMES = ("sd1", "sd2", "sdxl", "flux", "sd3")
GENERIC = "generic"

__all__ = [
    "ARCH_NAMES", "GENERIC", "Arch", "ModuleSpec", "ParamSpec", "detect_arch_from_checkpoint",
    "lbw_presets", "lbw_slots", "lbw_weights", "load_arch",
]

_ALIASES = {"sd15": "sd1", "sd1.5": "sd1", "sd_1.5": "sd1", "sd21": "sd2", "sd2.1": "sd2", "flux1": "flux"}


def load_arch(name: str) -> Arch:
    """The table of one architecture (cached). Accepts sd15/sd21/flux1 as spellings too."""
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in ARCH_NAMES:
        raise LoraToolError(f"unknown architecture {name!r}: use one of {', '.join(ARCH_NAMES)}")
    return _load(key)


@cache
def _load(name: str) -> Arch:
    return Arch(read_table(name))
