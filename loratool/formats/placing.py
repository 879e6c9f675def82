"""Where a read file's modules sit and which layout they were stored in: the steps the tensor reader
(``read.py``) and the header-only reader (``shapes.py``) share, so both name a file's layout alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from loratool.arch import Place
from loratool.formats.detect import unsupported_reason
from loratool.formats.keys import KeyRef
from loratool.formats.layouts import LAYOUT_KEY


def placed_modules(refs: Mapping[str, KeyRef], written: Mapping[Any, dict[str, str]], places: list[Place | None],
                   note_unknown: Callable[[list[str], str], None]) -> Iterator[tuple[Place, dict[str, str], KeyRef]]:
    """(place, role -> key, first key's ref) of each module as written, at the family's place, or for a bare
    peft folder of a model no family knows the file's own name under ``model``; modules no family places go
    to ``note_unknown(keys, why)``."""
    for mid, place in zip(written, places, strict=True):
        keys = written[mid]
        first = refs[next(iter(keys.values()))]
        if place is None and first.layout == "peft":
            place = Place("model", first.name, False, False)
        if place is None:  # a kind we know we do not read says so; else no family has it
            key = next(iter(keys.values()))
            note_unknown(list(keys.values()),
                         unsupported_reason(key) or f"{first.name}: no known model family has this module")
            continue
        yield place, keys, first


def stored_layout(ref: KeyRef, place: Place, fam) -> str:
    """The layout a module's keys are in: the key's own spelling, refined by how the family named it (single-file
    names under a diffusers or peft scope are bfl's, or fal's for the families fal trains; a kohya id only musubi
    spells is musubi's)."""
    layout = ref.layout
    if layout == "original" or (layout in ("diffusers", "peft") and place.original):
        if layout == "peft" and "fal" in fam.layouts:
            return "fal"
        return "bfl" if place.component == "transformer" else "ldm"
    if layout == "kohya" and ref.scope == "lora_unet" and "musubi" in fam.layouts:
        kohya = fam.spell("kohya", place.component, place.path)
        musubi = fam.spell("musubi", place.component, place.path)
        if musubi is not None and musubi.name == ref.name and (kohya is None or kohya.name != ref.name):
            return "musubi"
    return layout


def source_format(found: set[str], adapter, fam) -> str | list[str]:
    """``Adapter.source_format``: the layouts the modules were read in (one name, or a sorted list)."""
    if found == {"diffusers"} and "aitoolkit" in fam.layouts and made_by_aitoolkit(adapter.metadata):
        found = {"aitoolkit"}
    if "musubi" in found or (found == {"kohya"} and adapter.metadata.get(LAYOUT_KEY) == "musubi"):
        found = (found - {"kohya"}) | {"musubi"}  # ids both spell alike are musubi's too
    if found & {"lycoris", "onetrainer"}:
        found.discard("kohya")  # their text-encoder keys are spelled like kohya's
    if not found:
        return "unknown" if adapter.unknown else "empty"
    return found.pop() if len(found) == 1 else sorted(found)


def made_by_aitoolkit(metadata: Mapping[str, str]) -> bool:
    """ai-toolkit's own files say so in ``software``; ours written in its layout in ``loratool.layout``."""
    return "ai-toolkit" in metadata.get("software", "") or "ai-toolkit" in metadata.get("ss_training_comment", "") \
        or metadata.get(LAYOUT_KEY) == "aitoolkit"
