"""One key at a time: which layout spelled it, how its module is named, what role the tensor has. Torch-free.

Every key of an adapter file is split into a module name and a suffix; the suffix gives the tensor's *role*
(down, up, alpha, hada_w1_a, ...), the name's spelling gives the *layout* and how the family registry reads the
name (``style``: ``kohya`` underscored ids, ``diffusers`` dotted diffusers paths, ``original`` dotted single-file
paths, ``xlabs``) and the *scope* (the component token as written: ``lora_te1``, ``unet``, ``diffusion_model``,
or ``""``). Which module that is, is the family's answer (``loratool.arch.Family.resolve``), once the whole
file has been seen. Detection is per key, never a global guess: a file mixing layouts is read key by key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

# suffix -> role, tried longest first. Attention-processor keys ("processor.to_q_lora.down.weight") apart.
SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "bias",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_A": "down", ".lora_B": "up",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
    ".dora_layer.weight": "magnitude",  # musubi-tuner networks with DoRA: peft's per-output-row magnitude
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha", ".dora_scale": "dora_scale",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".diff": "diff", ".diff_b": "diff_b", ".w_norm": "w_norm", ".b_norm": "b_norm",
}
_ORDERED = sorted(SUFFIXES, key=len, reverse=True)
_OLD_SUFFIXES = (".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight",
                 ".lora_linear_layer.up.weight")
LYCORIS_ROLES = frozenset(r for r in SUFFIXES.values() if r.startswith(("hada_", "lokr_")) or r in
                          {"diff", "diff_b", "w_norm", "b_norm"})

# kohya-style scope tokens: which layout writes each one
KOHYA_SCOPES = {"lora_unet": "kohya", "lora_te": "kohya", "lora_te1": "kohya", "lora_te2": "kohya",
                "lora_te3": "kohya", "lora_transformer": "onetrainer", "lycoris": "lycoris"}
_KOHYA_ID = re.compile(r"^(lora_unet|lora_te[123]?|lora_transformer|lycoris)_(.+)$")
# diffusers pipeline components (the first name of a diffusers key)
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
# attention processors: diffusers <= 0.20 (to_q/to_k/to_v/to_out) and XLabs Flux (qkv/proj, stream digit)
_PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out|qkv|proj)_lora(\d?)\.(down|up)\.weight$")
ATTNPROC_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
ATTNPROC_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
PEFT_SCOPE = "base_model.model"
ORIGINAL_SCOPE = "diffusion_model"


@dataclass(frozen=True)
class KeyRef:
    """One tensor key, read: the layout that spells keys this way, how the module name is written
    (``style``, ``scope``, ``name``) and the tensor's role."""

    layout: str  # kohya, onetrainer, lycoris, diffusers, diffusers-old, diffusers-attnproc, peft, original, xlabs
    style: str  # kohya, diffusers, original, xlabs (see loratool.arch.Family.resolve)
    scope: str
    name: str
    role: str

    @property
    def module_id(self) -> tuple[str, str, str]:
        return (self.style, self.scope, self.name)


def split_suffix(key: str) -> tuple[str, str] | None:
    for suffix in _ORDERED:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], SUFFIXES[suffix]
    return None


def _processor(key: str) -> KeyRef | None:
    m = _PROCESSOR.match(key)
    if not m:
        return None
    module, proj, stream, role = m.groups()
    if proj in ("qkv", "proj"):
        return KeyRef("xlabs", "xlabs", "", f"{module}.{proj}{stream}", role)
    if stream:
        return None
    head, _, rest = module.partition(".")
    scope, path = (head, rest) if head in DIFFUSERS_COMPONENTS else ("unet", module)
    leaf = (ATTNPROC_TEXT if scope.startswith("text_encoder") else ATTNPROC_UNET)[proj]
    return KeyRef("diffusers-attnproc", "diffusers", scope, f"{path}.{leaf}", role)


def _named(module_id: str, role: str, key: str) -> KeyRef | None:
    m = _KOHYA_ID.match(module_id)
    if m:  # Wan-Fun writes lora_unet__blocks_…: one underscore too many
        return KeyRef(KOHYA_SCOPES[m.group(1)], "kohya", m.group(1), m.group(2).lstrip("_"), role)
    head, _, rest = module_id.partition(".")
    if module_id.startswith(PEFT_SCOPE + "."):
        return KeyRef("peft", "diffusers", "", module_id[len(PEFT_SCOPE) + 1:], role)
    if head == ORIGINAL_SCOPE:
        return KeyRef("original", "original", head, rest, role)
    layout = "diffusers-old" if key.endswith(_OLD_SUFFIXES) else "diffusers"
    if head in DIFFUSERS_COMPONENTS:
        return KeyRef(layout, "diffusers", head, rest, role)
    return KeyRef(layout, "diffusers", "", module_id, role)


def parse_key(key: str) -> KeyRef | None:
    """How one tensor key is spelled, or None when no known layout spells keys this way."""
    ref = _processor(key)
    if ref is not None:
        return ref
    split = split_suffix(key)
    if split is None:
        return None
    return _named(split[0], split[1], key)


def weight_dims(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """(out, in·kernel) of the weight a module's role -> shape pairs adapt, when the shapes tell it
    (LoRA/LoCon with or without a Tucker core, LoHa, a full diff); None otherwise (LoKr, a lone role)."""
    if "up" in shapes and "down" in shapes:
        up, down, mid = shapes["up"], shapes["down"], shapes.get("mid")
        kernel = math.prod(mid[2:]) if mid is not None and len(mid) == 4 else 1
        return int(up[0]), math.prod(int(s) for s in down[1:]) * kernel
    if "hada_w1_a" in shapes and "hada_w1_b" in shapes and "hada_t1" not in shapes:
        return int(shapes["hada_w1_a"][0]), math.prod(int(s) for s in shapes["hada_w1_b"][1:])
    if "diff" in shapes and len(shapes["diff"]) >= 2:
        d = shapes["diff"]
        return int(d[0]), math.prod(int(s) for s in d[1:])
    w1, w2 = _lokr_side(shapes, "1"), _lokr_side(shapes, "2")
    if w1 is not None and w2 is not None:  # kron(w1, w2): rows and columns multiply
        return w1[0] * w2[0], w1[1] * w2[1]
    return None


def _lokr_side(shapes: Mapping[str, tuple[int, ...]], side: str) -> tuple[int, int] | None:
    """(rows, columns·kernel) of one LoKr side: whole, as a product of two factors, or a Tucker core's."""
    whole, a, b = shapes.get(f"lokr_w{side}"), shapes.get(f"lokr_w{side}_a"), shapes.get(f"lokr_w{side}_b")
    if whole is not None:
        return int(whole[0]), math.prod(int(s) for s in whole[1:])
    if a is None or b is None:
        return None
    core = shapes.get(f"lokr_t{side}")
    if core is not None:  # t [r, r, kh, kw], a [r, rows], b [r, columns]
        return int(a[1]), int(b[1]) * math.prod(int(s) for s in core[2:])
    return int(a[0]), math.prod(int(s) for s in b[1:])
