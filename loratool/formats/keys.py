"""One key at a time: which layout spelled it, which module it belongs to, what role the tensor has.

Every key of an adapter file is split into ``(module id, suffix)``; the suffix gives the tensor's
*role* (down, up, alpha, hada_w1_a, ...) and the module id's prefix gives the *family* (kohya,
diffusers attention processor, peft, BFL Flux ...) and the component. Detection is per key, never a
global guess: a file mixing families is read key by key and reported as mixed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loratool.formats import archinfo, names

# suffix -> role, tried longest first. "processor.to_q_lora.down.weight" style is handled apart.
_SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "bias",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_A": "down", ".lora_B": "up",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha", ".dora_scale": "dora_scale",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".diff": "diff", ".diff_b": "diff_b", ".w_norm": "w_norm", ".b_norm": "b_norm",
}
_ORDERED = sorted(_SUFFIXES, key=len, reverse=True)
LYCORIS_ROLES = frozenset(r for r in _SUFFIXES.values() if r.startswith(("hada_", "lokr_")) or r in
                          {"diff", "diff_b", "w_norm", "b_norm"})

_KOHYA_TE = re.compile(r"lora_te([123]?)_(.+)$")
_ATTNPROC = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_XLABS = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora(\d?)\.(down|up)\.weight$")
_DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
_UNET_ROOTS = {"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
               "add_embedding", "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"}
_TE_ATTNPROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass(frozen=True)
class KeyRef:
    """Where one tensor belongs. ``path`` is canonical (diffusers naming) except for ``raw`` ids."""

    family: str  # kohya, lycoris, onetrainer, diffusers-attnproc, diffusers-old, diffusers-peft, peft, flux-bfl,
    #              flux-xlabs, ldm (ComfyUI-native ``diffusion_model.`` SD UNet ids)
    component: str
    path: str
    role: str
    swap: bool = False  # BFL final_layer.adaLN_modulation: up rows are [shift, scale] (see flux.py)


def split_suffix(key: str) -> tuple[str, str] | None:
    for suffix in _ORDERED:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], _SUFFIXES[suffix]
    return None


def _unet_or_transformer(path: str) -> str:
    return "unet" if path.split(".", 1)[0] in _UNET_ROOTS else "transformer"


def canonical_unet(path: str) -> str:
    converted = names.sai_unet_to_diffusers(path) if names.is_sai_unet_path(path) else None
    return converted or path


def _transformer_path(path: str) -> tuple[str, bool]:
    """A transformer path in BFL names becomes diffusers names (fused pseudo-modules for qkv)."""
    if path.split(".", 1)[0] in names.BFL_ROOTS:
        converted = names.bfl_to_diffusers(path)
        if converted is not None:
            return converted, converted == names.FLUX_SWAPPED
    return path, False


def place(component: str, path: str) -> tuple[str, str, bool]:
    """Canonical (component, path, swap) for a path already in dots."""
    if component == "unet":
        return "unet", canonical_unet(path), False
    if component == "transformer":
        p, swap = _transformer_path(path)
        return "transformer", p, swap
    if component.startswith("text_encoder"):
        return component, names.text_encoder_path(path), False
    return component, path, False


def _kohya(module_id: str, role: str) -> KeyRef | None:
    known = archinfo.from_kohya_with_base(module_id) if module_id.startswith("lora_") else None
    if known is not None:
        (key, base), onetrainer = known, module_id.startswith("lora_transformer_")
        comp, _, path = key.partition(".")
        family = "onetrainer" if onetrainer else ("lycoris" if role in LYCORIS_ROLES else "kohya")
        # SAI/BFL modulation rows come [shift, scale]; diffusers names (OneTrainer) already [scale, shift]
        return KeyRef(family, comp, path, role, not onetrainer and bool(archinfo.rows_swapped(base, key)))
    if module_id.startswith("lora_unet_"):
        path = names.underscore_to_path(module_id[len("lora_unet_"):])
        comp, p, swap = place(_unet_or_transformer(path), path)
        family = "lycoris" if role in LYCORIS_ROLES else "kohya"
        return KeyRef(family, comp, p, role, swap)
    m = _KOHYA_TE.match(module_id)
    if m:
        comp = f"text_encoder_{m.group(1)}" if m.group(1) in ("2", "3") else "text_encoder"
        path = names.underscore_to_path(m.group(2))
        family = "lycoris" if role in LYCORIS_ROLES else "kohya"
        return KeyRef(family, comp, names.text_encoder_path(path), role)
    if module_id.startswith("lycoris_"):
        path = names.underscore_to_path(module_id[len("lycoris_"):])
        comp, p, swap = place(_unet_or_transformer(path), path)
        return KeyRef("lycoris", comp, p, role, swap)
    if module_id.startswith("lora_transformer_"):
        path = names.underscore_to_path(module_id[len("lora_transformer_"):])
        comp, p, swap = place("transformer", path)
        return KeyRef("onetrainer", comp, p, role, swap)
    return None


def _dotted(module_id: str, role: str, key: str) -> KeyRef | None:
    if "." not in module_id:
        return None
    if module_id.startswith("base_model.model."):
        return KeyRef("peft", "", module_id[len("base_model.model."):], role)
    if module_id.startswith("diffusion_model."):
        path = module_id[len("diffusion_model."):]
        comp, p, swap = place(_unet_or_transformer(path), path)
        return KeyRef("flux-bfl" if comp == "transformer" else "ldm", comp, p, role, swap)
    head, _, rest = module_id.partition(".")
    old = key.endswith((".lora.down.weight", ".lora.up.weight", "lora_linear_layer.down.weight",
                        "lora_linear_layer.up.weight"))
    family = "diffusers-old" if old else "diffusers-peft"
    if head in _DIFFUSERS_COMPONENTS:
        comp, p, swap = place(head, rest)
        return KeyRef(family, comp, p, role, swap)
    root = head
    if root in _UNET_ROOTS or root in {"transformer_blocks", "single_transformer_blocks"} | names.BFL_ROOTS:
        comp, p, swap = place(_unet_or_transformer(module_id), module_id)
        return KeyRef(family, comp, p, role, swap)
    return None


def _attnproc(key: str) -> KeyRef | None:
    m = _ATTNPROC.match(key)
    if not m:
        return None
    module, proj, role = m.group(1), m.group(2), m.group(3)
    head, _, rest = module.partition(".")
    if head in _DIFFUSERS_COMPONENTS:
        comp = head
    else:
        comp, rest = _unet_or_transformer(module), module
    if comp.startswith("text_encoder"):
        return KeyRef("diffusers-attnproc", comp, names.text_encoder_path(f"{rest}.{_TE_ATTNPROC[proj]}"), role)
    leaf = "to_out.0" if proj == "to_out" else proj
    comp, p, _ = place(comp, f"{rest}.{leaf}")
    return KeyRef("diffusers-attnproc", comp, p, role)


def _xlabs(key: str) -> KeyRef | None:
    m = _XLABS.match(key)
    if not m:
        return None
    blocks, n, kind, side, role = m.groups()
    if blocks == "double_blocks":
        stream = "img" if side in ("1", "") else "txt"
        bfl = f"double_blocks.{n}.{stream}_attn.{kind}"
        return KeyRef("flux-xlabs", "transformer", names.bfl_to_diffusers(bfl) or bfl, role)
    # single blocks: qkv_lora covers the q/k/v rows of linear1 only, proj_lora is linear2
    path = f"single_transformer_blocks.{n}.{'attn.to_qkv' if kind == 'qkv' else 'proj_out'}"
    return KeyRef("flux-xlabs", "transformer", path, role)


def parse_key(key: str) -> KeyRef | None:
    """The place of one tensor key, or None when no known layout spells keys this way."""
    ref = _attnproc(key) or _xlabs(key)
    if ref is not None:
        return ref
    split = split_suffix(key)
    if split is None:
        return None
    module_id, role = split
    return _kohya(module_id, role) or _dotted(module_id, role, key)
