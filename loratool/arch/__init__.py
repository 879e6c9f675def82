"""The architecture registry: what each model family contains and how every layout names it, as data.

    from loratool.arch import family, detect_adapter, load_arch
    flux = family("flux")                     # an entry (data/flux.json) with its table; aliases accepted
    flux.resolve("kohya", "lora_unet", "double_blocks_0_img_attn_qkv")   # Place(transformer, ...to_qkv)
    flux.spell("original", "transformer", "transformer_blocks.0.attn.to_qkv")
    load_arch("sdxl")                         # the table alone (modules, checkpoint map, LBW); cached

Files: ``registry`` (entries, name resolution and spelling per layout style: ``names`` on ``indexes``, the
table's lookup indexes; ``cache`` keeps built tables and indexes on disk between runs), ``detect`` (the one detection, for
adapters and checkpoints, keys and metadata weighed), ``table`` (a table in memory), ``rules`` (a table from
rules, for families whose sizes vary), ``naming`` (cross-family naming: kohya's underscores, CLIP paths, block
labels), ``families/`` (algorithmic original <-> diffusers mappings), ``lbw`` (block weights), ``convert``
(single-file <-> diffusers tensors; imports torch), ``data/`` (entries) and ``data/tables/`` (generated tables).

Table attributes (see table.py):
- name, components (unet/transformer + text encoders; the vae is in all_components and the param map only)
- modules: {"component.path": ModuleSpec}: every Linear/Conv2d weight of the unet/transformer and every
  Linear of the text encoders (VAE layers are not targets). ModuleSpec: component, path (diffusers naming,
  CLIP paths always with text_model.), shape, group (attn|conv|other), block (LBW), kohya (module id as
  sd-scripts writes it), checkpoint_key, checkpoint_rows, plus row_order (a row permutation: BFL/MMDiT
  final_layer modulation halves swap), fused_in (the fused pseudo-module a part lives in) and parts.
- fused: {fused key: [(part key, (start, stop))]}: Flux's attn.to_qkv / attn.to_added_qkv / to_qkv_mlp and
  SD3's to_qkv / to_added_qkv. Fused modules and their parts are both in `modules`; a part's kohya id is the
  fused module's (kohya never splits them).
- targets(kind, fused=True, components=None): kind attn | attn+conv | all; fused=True gives kohya's
  granularity (fused modules instead of parts), fused=False diffusers' (parts instead of fused modules).
- checkpoint_map, checkpoint_params, diffusers_param_map, checkpoint_shape, is_checkpoint_extra: the full
  single-file <-> diffusers folder map; loratool.arch.convert moves the tensors.
- lbw: slots, vector subsets, presets; lbw_weights(arch_name, spec) parses a vector or preset.

Single-file naming used by the tables: sd1 LDM (model.diffusion_model., cond_stage_model.transformer.,
first_stage_model.); sd2 LDM with OpenCLIP-H (cond_stage_model.model.); sdxl SGM (conditioner.embedders.0
/.1); flux and sd3 as ComfyUI saves whole checkpoints (model.diffusion_model., text_encoders.clip_l/
clip_g/t5xxl.transformer., vae. for flux, first_stage_model. for sd3). SD2's text encoder is the 23-layer HF
CLIP that diffusers and kohya use (OpenCLIP-H's unused 24th layer is listed as a checkpoint extra).
The generic family (unknown models) has no table: names are kept as the file has them.
"""

from __future__ import annotations

from loratool.arch.detect import (
    Detection,
    checkpoint_family,
    detect_adapter,
    detect_arch_from_checkpoint,
    detect_checkpoint,
    family_from_metadata,
)
from loratool.arch.lbw import lbw_presets, lbw_slots, lbw_weights
from loratool.arch.registry import (
    Family,
    Place,
    Spelling,
    canonical_family,
    family,
    family_for,
    family_names,
    model,
    model_names,
    retargets,
)
from loratool.arch.registry import families as all_families  # ``loratool.arch.families`` is the subpackage
from loratool.arch.table import Arch, ModuleSpec, ParamSpec
from loratool.errors import LoraToolError

GENERIC = "generic"
ARCH_NAMES = tuple(f.name for f in all_families() if f.entry.get("table") or f.entry.get("rules"))

__all__ = [
    "ARCH_NAMES", "GENERIC", "Arch", "Detection", "checkpoint_family", "checkpoint_table", "Family", "ModuleSpec", "ParamSpec", "Place", "Spelling",
    "all_families", "canonical_family", "detect_adapter", "detect_arch_from_checkpoint", "detect_checkpoint",
    "family", "family_for", "family_from_metadata", "family_names", "model", "model_names", "retargets", "lbw_presets", "lbw_slots", "lbw_weights", "load_arch",
]


def checkpoint_table(name: str | None, shapes) -> Arch | None:
    """The table of the family ``name`` (``load_arch``'s names) at the sizes a checkpoint's ``{key: shape}`` show
    (a family described by rules: Wan 1.3B or 14B); None for no family (``generic``/``unknown``)."""
    if not name or name in ("unknown", GENERIC):
        return None
    load_arch(name)  # the one error for an unknown name
    fam = model(name)
    if fam.rules and fam.variant is None:
        fam = checkpoint_family(fam, dict(shapes))
    return fam.table


def load_arch(name: str) -> Arch:
    """The table of one family (cached). Accepts aliases (sd15, sd21, flux1, ...) and size variants of the families
    described by rules (``wan-1.3b``, ``sd3.5-large``: ``registry.model``)."""
    try:
        fam = model(name) if canonical_family(name) != GENERIC else None
    except LoraToolError:
        fam = None
    if fam is None or fam.table is None:
        raise LoraToolError(f"unknown architecture {name!r}: use one of {', '.join(ARCH_NAMES)}")
    return fam.table
