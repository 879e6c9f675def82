"""Naming rules that hold across families: kohya's underscored ids, text-encoder paths, block labels.

* kohya ids replace every ``.`` of a module path by ``_``; :func:`underscore_to_path` undoes that with a
  vocabulary of the names that contain ``_`` themselves (every family's table supplies its own, see
  ``registry.vocabulary``).
* CLIP text encoders: one spelling, always with the ``text_model.`` wrapper (transformers 5 dropped it from
  ``CLIPTextModel``; a ``CLIPTextModelWithProjection`` keeps it). A peft folder binds to a concrete model, so
  its CLIP keys follow the model class (:func:`peft_text_encoder_path`). T5 encoders have one spelling.
* :func:`block_label`: the readable block of a module (``unet:down_blocks.1``) that ``inspect`` sums over.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache

_CLIP_WRAPPER = "text_model."
_CLIP_ROOTS = frozenset({"encoder", "embeddings", "final_layer_norm"})
_T5_ROOTS = ("encoder.block.", "shared", "encoder.final_layer_norm")


def underscore_to_path(module_id: str, words: Collection[str]) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``: at each position
    the longest run of parts that is a known word stays joined."""
    parts = module_id.split("_")
    longest = _longest(words) if isinstance(words, frozenset) else max((w.count("_") + 1 for w in words), default=1)
    out: list[str] = []
    i = 0
    while i < len(parts):
        for n in range(min(longest, len(parts) - i), 1, -1):
            cand = "_".join(parts[i:i + n])
            if cand in words:
                out.append(cand)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


@lru_cache(maxsize=8)
def _longest(words: frozenset[str]) -> int:
    return max((w.count("_") + 1 for w in words), default=1)


def path_to_underscore(path: str) -> str:
    return path.replace(".", "_")


# ---------------------------------------------------------------- text encoders

def is_t5_path(path: str) -> bool:
    return path.startswith(_T5_ROOTS)


def text_encoder_path(path: str) -> str:
    """A text-encoder module path in its one spelling (CLIP paths with ``text_model.``)."""
    if path.split(".", 1)[0] in _CLIP_ROOTS and not is_t5_path(path):
        return _CLIP_WRAPPER + path
    return path


def without_clip_wrapper(path: str) -> str:
    """A CLIP path as patterns and flat (transformers 5) ``CLIPTextModel`` state dicts spell it."""
    return path[len(_CLIP_WRAPPER):] if path.startswith(_CLIP_WRAPPER) else path


# peft folders bind to a concrete model's module names, so their CLIP keys follow the model class.
# transformers 5 made CLIPTextModel flat (``encoder.layers.…``) while CLIPTextModelWithProjection keeps
# ``text_model.`` (its ``text_model`` is a flat CLIPTextModel); transformers 4 nests both.
CLIP_LAYOUTS = ("auto", "flat", "nested")


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


def peft_text_encoder_path(path: str, with_projection: bool, layout: str = "auto") -> str:
    """A canonical text-encoder path as the model a peft folder is loaded into names it.

    ``layout``: ``flat`` (transformers >= 5 CLIPTextModel), ``nested`` (``text_model.``, transformers 4), or
    ``auto``: the installed transformers' layout, and ``flat`` when transformers is not importable (the
    layout of the current transformers release). A CLIPTextModelWithProjection (``with_projection``) is
    nested in every version.
    """
    if layout not in CLIP_LAYOUTS:
        raise ValueError(f"unknown CLIP layout {layout!r} (choose from {', '.join(CLIP_LAYOUTS)})")
    path = text_encoder_path(path)
    if not path.startswith(_CLIP_WRAPPER) or with_projection:
        return path
    flat = layout == "flat" or (layout == "auto" and installed_clip_is_flat() is not False)
    return without_clip_wrapper(path) if flat else path


def state_dict_name(name: str, wanted: Collection[str]) -> str:
    """A table parameter name as a model's state dict has it: a flat CLIPTextModel has no ``text_model.``."""
    if name not in wanted and name.startswith(_CLIP_WRAPPER) and name[len(_CLIP_WRAPPER):] in wanted:
        return name[len(_CLIP_WRAPPER):]
    return name


# ---------------------------------------------------------------- block labels

_WRAPPERS = ("text_model", "encoder", "model", "base_model")


def block_label(component: str, path: str) -> str:
    """The first part of a module path (past wrappers such as ``text_model.encoder``) with its index when it
    has one: ``unet:down_blocks.1``, ``unet:mid_block``, ``text_encoder:layers.5``."""
    parts = path.split(".")
    while len(parts) > 2 and parts[0] in _WRAPPERS:
        parts = parts[1:]
    head = parts[0] + (f".{parts[1]}" if len(parts) > 1 and parts[1].isdigit() else "")
    return f"{component}:{head}" if component else head
