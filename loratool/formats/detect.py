"""Format and base-model detection: per key, by prefix and suffix, and from module names and shapes.

``detect_keys`` sorts every key of a file into its layout family (or the unknown list, by name);
``detect_base_model`` decides sd1 / sd2 / sdxl / flux / sd3 / unknown from the canonical modules:
cross-attention width (768 / 1024 / 2048), text-encoder widths, block structure, Flux blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from loratool.core.modules import Module
from loratool.formats.keys import KeyRef, parse_key

CLONEOFSIMO = re.compile(r"^(unet|text_encoder|text_encoder_2):(\d+):(up|down)$")
TI_KEYS = ("emb_params", "clip_l", "clip_g")
_CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_WIDTH = {768: "sd1", 1024: "sd2"}


@dataclass
class KeyReport:
    """Every key of a file, sorted: recognised (with its place) or unknown (by name)."""

    refs: dict[str, KeyRef] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    special: str | None = None  # "cloneofsimo" | "textual-inversion" | "cloneofsimo-legacy"

    @property
    def families(self) -> list[str]:
        return sorted({r.family for r in self.refs.values()})


def special_layout(keys: Iterable[str], metadata: Mapping[str, str]) -> str | None:
    """Layouts recognised from the whole key set (their keys carry no module names)."""
    keys = list(keys)
    if any(CLONEOFSIMO.match(k) for k in keys):
        return "cloneofsimo"
    if any(k in TI_KEYS or k.startswith("string_to_param.") for k in keys):
        return "textual-inversion"
    if keys and all(k.isdigit() for k in keys):
        return "cloneofsimo-legacy"
    return None


def detect_keys(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> KeyReport:
    keys = list(keys)
    report = KeyReport(special=special_layout(keys, metadata or {}))
    if report.special:
        return report
    for key in keys:
        ref = parse_key(key)
        if ref is None:
            report.unknown.append(key)
        else:
            report.refs[key] = ref
    return report


# adapter kinds and families we recognise but do not read: key pattern -> what it is
_UNSUPPORTED = [
    (re.compile(r"\.(oft_blocks|oft_diag|rescale)$|^oft_"), "an OFT/BOFT tensor (orthogonal fine-tuning is not supported)"),
    (re.compile(r"\.on_input$"), "an (IA)3 tensor (not supported)"),
    (re.compile(r"_(lora_down|lora_up|lora_A|lora_B)\.weight$"),
     "no known adapter key layout: its suffix is joined with '_' where kohya writes '.' (a hand conversion?)"),
    (re.compile(r"\.(a1|a2|b1|b2|bm)\.weight$"), "a GLoRA tensor (not supported)"),
    (re.compile(r"\.lora_E$"), "an AdaLoRA singular-value tensor (not supported)"),
    (re.compile(r"\.lora_embedding_[AB]$"), "a peft embedding-layer LoRA (not supported)"),
    (re.compile(r"^bundle_emb\."), "a textual-inversion embedding bundled in a LoRA (A1111 bundle_emb; not read)"),
    (re.compile(r"^lora_prior_(unet|te)_"), "a Stable Cascade prior module (no table for it)"),
    (re.compile(r"\.(bias_indices|bias_values|bias_size)$"), "a LyCORIS sparse-bias tensor (not supported)"),
    (re.compile(r"\.(set_weight|reshape_weight)$"), "a ComfyUI weight override (not an adapter delta)"),
    (re.compile(r"_norm\.scale$"), "a norm weight stored whole (BFL control LoRA): it replaces the weight, not a delta"),
]


def unknown_reason(key: str) -> str:
    """Why a key that no codec placed is left out: a known but unsupported kind, or no known layout."""
    for pattern, reason in _UNSUPPORTED:
        if pattern.search(key):
            return reason
    return "matches no known adapter key layout"


def _in_width(module: Module) -> int | None:
    shape = module.weight_shape
    return int(shape[1]) if len(shape) >= 2 else None


def _transformer_base(modules: Mapping[str, Module]) -> str:
    paths = [m.path for m in modules.values() if m.component == "transformer"]
    if any(p.startswith(("single_transformer_blocks.", "single_blocks.", "double_blocks.")) for p in paths):
        return "flux"
    if any(p.startswith(("joint_blocks.", "context_block")) for p in paths):
        return "sd3"
    for m in modules.values():
        if m.component == "transformer" and re.match(r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_qkv)$",
                                                     m.path):
            return "flux" if _in_width(m) == 3072 else "sd3"
    return "flux" if any(p.startswith(("x_embedder", "context_embedder", "time_text_embed")) for p in paths) \
        else "unknown"


def _unet_base(modules: Mapping[str, Module]) -> str | None:
    unet = [m for m in modules.values() if m.component == "unet"]
    for m in unet:
        if re.search(r"attn2\.to_[kv]$", m.path):
            width = _in_width(m)
            if width in _CROSS_WIDTH:
                return _CROSS_WIDTH[width]
    paths = [m.path for m in unet]
    if any(p.startswith(("add_embedding.", "label_emb.")) for p in paths):
        return "sdxl"
    if any(re.search(r"attentions\.\d+\.transformer_blocks\.[1-9]", p) for p in paths):
        return "sdxl"
    if any(p.startswith(("down_blocks.3.", "down_blocks.0.attentions.", "up_blocks.3.attentions.")) for p in paths):
        for m in unet:
            if m.path.endswith("proj_in"):
                return "sd1" if len(m.weight_shape) == 4 else "sd2"
        return "sd1"
    return None


def _text_encoder_base(modules: Mapping[str, Module]) -> str | None:
    comps = {m.component: m for m in modules.values() if m.component.startswith("text_encoder")}
    te2 = comps.get("text_encoder_2")
    if te2 is not None and "text_model." in te2.path:
        widths = {_in_width(m) for m in modules.values() if m.component == "text_encoder_2"}
        if 1280 in widths:
            return "sdxl"
    for m in modules.values():
        if m.component == "text_encoder" and re.search(r"self_attn\.(q|k|v)_proj$", m.path):
            return _TE_WIDTH.get(_in_width(m) or 0)
    return None


def detect_base_model(modules: Mapping[str, Module]) -> str:
    """sd1 | sd2 | sdxl | flux | sd3 | unknown, from canonical modules (names and shapes)."""
    comps = {m.component for m in modules.values()}
    if "transformer" in comps:
        return _transformer_base(modules)
    if any(m.component.startswith("text_encoder") and m.path.startswith("encoder.block.") for m in modules.values()) \
            and "unet" not in comps:
        return "flux"
    return _unet_base(modules) or _text_encoder_base(modules) or "unknown"


def embedding_base(widths: Iterable[int], has_clip_g: bool) -> str:
    if has_clip_g:
        return "sdxl"
    for w in widths:
        if w in _TE_WIDTH:
            return _TE_WIDTH[w]
    return "unknown"
