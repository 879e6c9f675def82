"""Layout detection, per key: every key of a file sorted into the layout that spells it, or the unknown list
with the reason. Torch-free. (Which model family the modules belong to is ``loratool.arch.detect``'s answer.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from loratool.formats.keys import KeyRef, parse_key

CLONEOFSIMO = re.compile(r"^(unet|text_encoder|text_encoder_2):(\d+):(up|down)$")
TI_KEYS = ("emb_params", "clip_l", "clip_g")


@dataclass
class KeyReport:
    """Every key of a file, sorted: recognised (with its place) or unknown (by name)."""

    refs: dict[str, KeyRef] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    special: str | None = None  # "cloneofsimo" | "textual-inversion" | "cloneofsimo-legacy"

    @property
    def layouts(self) -> list[str]:
        return sorted({r.layout for r in self.refs.values()})


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


def unsupported_reason(key: str) -> str | None:
    """What a key is when it is a kind or family we recognise but do not read; None otherwise."""
    return next((reason for pattern, reason in _UNSUPPORTED if pattern.search(key)), None)


def unknown_reason(key: str) -> str:
    """Why a key that no codec placed is left out: a known but unsupported kind, or no known layout."""
    return unsupported_reason(key) or "matches no known adapter key layout"
