"""What each output layout can hold, as data: the conversion decides per module from this table.

A codec (loratool/formats) knows how keys are spelt; this table says what survives the trip
exactly (an alpha per module, rsLoRA, DoRA along which axis, LyCORIS kinds, Tucker cores, the
fused Flux projections) so that :func:`loratool.ops.convert.convert` can decide, before any
bytes are written, what is renamed, what is rewritten exactly and what would be lost.
"""

from __future__ import annotations

from dataclasses import dataclass

from loratool.errors import LoraToolError
from loratool.formats.write import ALIASES


@dataclass(frozen=True)
class TargetSpec:
    """What one output layout can express."""

    name: str
    kinds: frozenset[str]  # module kinds stored as they are (lora, loha, lokr, full, norm)
    alpha: bool  # a per-module alpha has a place in the file
    rslora: bool  # rsLoRA (alpha/√r) can be flagged
    dora_axes: frozenset[str]  # DoRA magnitude conventions the layout holds
    tucker: bool  # a LoCon Tucker core (lora_mid) is kept
    flux_fused: bool  # Flux attention/linear1 as kohya/BFL fused projections (else split diffusers names)
    components: frozenset[str]
    bias: bool = False  # a bias change (LyCORIS diff_b) has a place
    kohya_metadata: bool = False  # ss_network_module describes the file


_DENOISERS = frozenset({"unet", "transformer"})
_TEXT = frozenset({"text_encoder", "text_encoder_2", "text_encoder_3"})

TARGETS: dict[str, TargetSpec] = {
    "kohya": TargetSpec("kohya", frozenset({"lora", "loha", "lokr", "full", "norm"}), alpha=True, rslora=False,
                        dora_axes=frozenset({"in", "out"}), tucker=True, flux_fused=True,
                        components=_DENOISERS | _TEXT, bias=True, kohya_metadata=True),
    "diffusers": TargetSpec("diffusers", frozenset({"lora"}), alpha=True, rslora=True,
                            dora_axes=frozenset({"out"}), tucker=False, flux_fused=False,
                            components=_DENOISERS | _TEXT),
    "peft": TargetSpec("peft", frozenset({"lora"}), alpha=True, rslora=True, dora_axes=frozenset({"out"}),
                       tucker=False, flux_fused=False, components=_DENOISERS | _TEXT | {"model"}),
    "aitoolkit": TargetSpec("aitoolkit", frozenset({"lora"}), alpha=False, rslora=False, dora_axes=frozenset(),
                            tucker=False, flux_fused=False, components=_DENOISERS | _TEXT),
    "bfl": TargetSpec("bfl", frozenset({"lora"}), alpha=False, rslora=False, dora_axes=frozenset(),
                      tucker=False, flux_fused=True, components=frozenset({"transformer"})),
}

FORMAT_CHOICES: tuple[str, ...] = tuple(k for k, v in ALIASES.items() if v in TARGETS)


def resolve_target(name: str) -> TargetSpec:
    """The layout for a ``--to`` value (aliases included), or a one-line error listing the choices."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    try:
        return TARGETS[key]
    except KeyError:
        raise LoraToolError(f"unknown output format {name!r} (use one of: {', '.join(FORMAT_CHOICES)})") from None
