"""Every adapter file layout, once: its name (what ``inspect`` reports, what ``--to`` accepts), what it can hold,
and the codec that writes it. Torch-free (codecs are imported when they encode).

One name set: a file read as ``diffusers`` is written as ``diffusers``, and ``--to diffusers`` writes it. The
families a layout applies to are listed in each family's entry (``loratool.arch``), not here. A layout that no
current tool loads is read only, and says why in one line.

=====================  =====================================================================================
kohya                  ``lora_unet_…``/``lora_te*_…`` ids, ``lora_down``/``lora_up``/``alpha``; LyCORIS kinds
                       (LoHa, LoKr, full, norm, Tucker, DoRA ``dora_scale``) as LyCORIS saves them with kohya
                       ids. Aliases webui, comfyui, a1111, forge.
lycoris                the LyCORIS wrapper's ``lycoris_<diffusers path>`` ids (SimpleTuner), denoiser only.
onetrainer             ``lora_transformer_<diffusers path>`` (transformers; UNets keep ``lora_unet_``) and TEs
                       numbered as diffusers numbers them (Flux T5: ``lora_te2``).
musubi                 musubi-tuner's own ``lora_unet_…`` ids with ``alpha``: single-file names where the trainer
                       keeps them (Wan, HunyuanVideo's Tencent names), diffusers names where it wraps a diffusers
                       model (Qwen-Image, Z-Image: q/k/v apart); the family's ``musubi_names`` says which. kohya is
                       what ComfyUI loads; musubi is what the trainer resumes from (they differ for HunyuanVideo
                       and Z-Image).
diffusers              ``<component>.<path>.lora_A/lora_B.weight``, alphas in ``lora_adapter_metadata``.
diffusers-old          diffusers 0.21's ``unet.<path>.lora.down.weight`` and
                       ``text_encoder.<path>.lora_linear_layer.down.weight`` (scale folded: no alpha there).
diffusers-attnproc     diffusers <= 0.20's ``unet.<path>.processor.to_q_lora.down.weight`` (attention
                       projections only; scale folded). Current diffusers loads it only with the ``unet.``
                       prefix, which is how it is written.
peft                   a peft folder (``base_model.model.<path>``, ``adapter_config.json``), one per component.
aitoolkit              ai-toolkit's Flux files: ``transformer.<diffusers path>``, scale folded, no alpha.
bfl                    ``diffusion_model.<single-file path>`` of a DiT (BFL Flux, SAI SD3, Wan, HunyuanVideo, …):
                       ``lora_A``/``lora_B`` with the scale folded (diffusion-pipe, ai-toolkit, lightx2v); LyCORIS
                       kinds with their own suffixes and alpha. Read also under ``transformer.`` or bare, and with
                       ``lora_down``/``lora_up``/``alpha``, ``.diff``, ``.diff_b``.
ldm                    ``diffusion_model.<LDM/SGM path>`` of an SD UNet, ``lora_down``/``lora_up``/``alpha``
                       (ComfyUI's own naming).
xlabs                  XLabs' Flux ``<block>.processor.qkv_lora1`` (read only).
fal                    fal's Flux Kontext trainer: ``base_model.model.<BFL path>.lora_A.weight`` (read only).
cloneofsimo            ``lora_diffusion``'s ``unet:N:up`` (read only).
textual-inversion      token embeddings: ``emb_params`` (SD1/SD2), ``clip_l``/``clip_g`` (SDXL).
=====================  =====================================================================================
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loratool.errors import LoraToolError

if TYPE_CHECKING:
    from loratool.core.modules import Adapter

LAYOUT_KEY = "loratool.layout"  # the one layout whose keys are spelt as another's (diffusers) says so here
ALL_KINDS = frozenset({"lora", "loha", "lokr", "full", "norm"})
_DENOISERS = frozenset({"unet", "transformer"})
_TEXT = frozenset({"text_encoder", "text_encoder_2", "text_encoder_3"})
_BOTH_AXES = frozenset({"in", "out"})


@dataclass(frozen=True)
class Layout:
    """One layout: how its keys are spelt (its codec), and what it can hold exactly."""

    name: str
    aliases: tuple[str, ...] = ()
    encoder: str | None = None  # "module:function" under loratool.formats; None: read only
    read_only: str | None = None  # why it cannot be written
    kinds: frozenset[str] = frozenset({"lora"})  # module kinds stored as they are
    alpha: bool = True  # a per-module alpha has a place in the file (else the scale is folded in)
    rslora: bool = False  # rsLoRA (alpha/√r) can be flagged
    dora_axes: frozenset[str] = frozenset()  # DoRA magnitude conventions the layout holds
    tucker: bool = False  # a LoCon Tucker core (lora_mid) is kept
    fused: bool | None = False  # fused projections as single-file checkpoints store them (else split, diffusers);
    # None: as the family's trainer names them (``names``)
    names: str | None = None  # the entry field that says which names this layout's ids carry (``musubi_names``)
    components: frozenset[str] | None = None  # None: every component
    bias: bool = False  # a bias change (LyCORIS diff_b) has a place
    kohya_metadata: bool = False  # ss_network_module describes the file
    attention_only: bool = False  # attention projections only (attention processors)
    folder: bool = False  # written as a folder (peft)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def writable(self) -> bool:
        return self.encoder is not None

    def holds_component(self, component: str) -> bool:
        return self.components is None or component in self.components

    def fused_for(self, family) -> bool:
        """Whether this layout stores a family's fused projections fused (kohya: yes; musubi: where the
        trainer keeps single-file names)."""
        if self.fused is not None:
            return self.fused
        return getattr(family, self.names or "", "diffusers") == "original"

    def encode(self, adapter: Adapter, metadata: Mapping[str, str] | None = None):
        """The tensors and metadata of ``adapter`` in this layout (see ``formats.write.encode``)."""
        from loratool.formats.write import encode

        return encode(adapter, self.name, metadata)

    def decode(self, tensors, metadata=None, config=None):
        """The canonical adapter of tensors in this layout (any other layout's keys are reported unknown)."""
        from loratool.formats.read import decode

        adapter = decode(tensors, metadata, config)
        found = adapter.source_format if isinstance(adapter.source_format, list) else [adapter.source_format]
        if any(f not in (self.name, "empty") for f in found):
            raise LoraToolError(f"these tensors are {adapter.source_format}, not {self.name}")
        return adapter

    def encoder_function(self):
        if self.encoder is None:
            raise LoraToolError(f"the {self.name} layout can only be read: {self.read_only}")
        module, _, function = self.encoder.partition(":")
        return getattr(importlib.import_module(f"loratool.formats.{module}"), function)


LAYOUTS: tuple[Layout, ...] = (
    Layout("kohya", ("webui", "comfyui", "a1111", "forge"), "kohya:encode_kohya",
           kinds=ALL_KINDS, dora_axes=_BOTH_AXES, tucker=True, fused=True, bias=True, kohya_metadata=True),
    Layout("lycoris", (), "kohya:encode_lycoris", kinds=ALL_KINDS, dora_axes=_BOTH_AXES, tucker=True,
           components=_DENOISERS, bias=True, kohya_metadata=True),
    Layout("onetrainer", ("one-trainer",), "kohya:encode_onetrainer", kinds=ALL_KINDS, dora_axes=_BOTH_AXES,
           tucker=True, bias=True, kohya_metadata=True),
    Layout("musubi", ("musubi-tuner",), "kohya:encode_musubi", kinds=ALL_KINDS, dora_axes=_BOTH_AXES, tucker=True,
           fused=None, names="musubi_names", components=_DENOISERS, bias=True, kohya_metadata=True),
    Layout("diffusers", (), "diffusers:encode_diffusers", rslora=True, dora_axes=frozenset({"out"}),
           components=_DENOISERS | _TEXT),
    Layout("diffusers-old", ("diffusers-0.21",), "diffusers:encode_diffusers_old", alpha=False,
           components=frozenset({"unet"}) | _TEXT),
    Layout("diffusers-attnproc", ("attnproc",), "diffusers:encode_attnproc", alpha=False,
           components=frozenset({"unet"}) | _TEXT, attention_only=True),
    Layout("peft", (), "diffusers:encode_peft_file", rslora=True, dora_axes=frozenset({"out"}), folder=True),
    Layout("aitoolkit", ("ai-toolkit",), "diffusers:encode_aitoolkit", alpha=False, components=_DENOISERS | _TEXT),
    Layout("bfl", (), "original:encode_bfl", kinds=ALL_KINDS, alpha=False, fused=True,
           components=frozenset({"transformer"}), bias=True),
    Layout("ldm", ("comfy-ldm",), "original:encode_ldm", kinds=ALL_KINDS, dora_axes=_BOTH_AXES, tucker=True,
           fused=True, components=frozenset({"unet"}), bias=True, kohya_metadata=True),
    Layout("xlabs", read_only="only XLabs' own nodes load it; ComfyUI and diffusers read kohya, bfl or diffusers "
           "Flux LoRAs (--to one of those)", fused=True),
    Layout("fal", read_only="only diffusers' fal-Kontext converter reads it (and only with every module of every "
           "block); ComfyUI maps no base_model.model. names for Flux (--to kohya, bfl or diffusers)", fused=True),
    Layout("cloneofsimo", read_only="only lora_diffusion's own loader (unmaintained) reads it; diffusers and the web "
           "UIs read diffusers or kohya (--to one of those)"),
    Layout("textual-inversion", ("embedding", "ti"), "special:encode_embeddings", kinds=frozenset()),
)
_BY_NAME = {lay.name: lay for lay in LAYOUTS}
_ALIASES = {**{a: lay.name for lay in LAYOUTS for a in lay.aliases}, **{lay.name: lay.name for lay in LAYOUTS}}
WRITABLE: tuple[str, ...] = tuple(lay.name for lay in LAYOUTS if lay.writable)
FORMATS: tuple[str, ...] = tuple(n for n, target in _ALIASES.items() if _BY_NAME[target].writable)


def find_layout(name: str) -> Layout | None:
    return _BY_NAME.get(_ALIASES.get(name.strip().lower(), "")) if isinstance(name, str) else None


def layout(name: str) -> Layout:
    """A layout by name or alias; a one-line error listing the choices."""
    found = find_layout(name)
    if found is None:
        raise LoraToolError(f"unknown output format {name!r} (use one of: {', '.join(FORMATS)})")
    return found


def writable_layout(name: str) -> Layout:
    """A layout that can be written (``--to``): unknown and read-only names are one-line errors."""
    found = layout(name)
    if not found.writable:
        raise LoraToolError(f"the {found.name} layout can only be read: {found.read_only}")
    return found


@dataclass(frozen=True)
class OutputChoice:
    """The layout an operation writes, and a one-line note when it is not the input's own."""

    name: str
    note: str | None = None


def output_layout(adapter: Adapter, requested: str | None = None) -> OutputChoice:
    """The layout an op writes its result in: ``requested`` (``--to``) when given, else the input's own.

    A file mixing layouts is written in the first one listed; an input read in a layout that cannot be
    written (xlabs, cloneofsimo) or that the result's family has no place in is written as kohya, and the
    note says so."""
    if requested:
        return OutputChoice(writable_layout(requested).name)
    source = adapter.source_format
    mixed = isinstance(source, list)
    first = source[0] if mixed and source else source
    found = find_layout(first) if isinstance(first, str) and first else None
    if found is None:
        return OutputChoice("kohya", None if not first or first in ("empty", "unknown", "test")
                            else f"{first} is no layout that can be written; writing kohya (--to chooses)")
    if not found.writable:
        return OutputChoice("kohya", f"the {found.name} layout can only be read ({found.read_only.split(';')[0]}); "
                            "writing kohya (--to chooses)")
    if not _applies(found, adapter):
        return OutputChoice("kohya", f"the {found.name} layout has no place for this {adapter.base_model} adapter; "
                            "writing kohya (--to chooses)")
    note = f"the input mixes {', '.join(source)}; writing {found.name} (--to chooses)" if mixed else None
    return OutputChoice(found.name, note)


def _applies(found: Layout, adapter: Adapter) -> bool:
    from loratool.arch import canonical_family, family

    name = canonical_family(adapter.base_model) or "generic"
    if found.name not in family(name).layouts:
        return False
    return all(found.holds_component(m.component) for m in adapter.modules.values())
