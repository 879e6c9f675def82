"""Which family a file belongs to: one detection, for adapters and for checkpoints, keys and metadata weighed.

Adapters (:func:`detect_adapter`): every family tries to name every module of the file (``Family.resolve``)
and to match its weight shape with its table. A family that names every module with the table's shapes fits
exactly; one that names them all but some at other widths (a small model built in the same block structure)
fits by name; one that names some, partly. The families at the best level are the candidates. One candidate:
the keys decide. Several (a LoRA of CLIP-L alone fits SD1, SDXL, Flux and SD3 alike): the file's metadata
picks among them; without metadata the first in priority order is taken and the candidates are reported. No
candidate: the metadata names the family when it can. Keys that decide overrule metadata (ai-toolkit writes
``ss_base_model_version: sd_1.5`` into Flux files).

Metadata read (each entry lists the prefixes that name it): ``modelspec.architecture``, a peft or diffusers
``base_model_name_or_path``, kohya's ``ss_base_model_version``, ``ss_v2``.

Checkpoints (:func:`detect_checkpoint`): staged key evidence (single-file or diffusers names and widths), the
first stage that matches decides; the metadata is recorded, not used (a checkpoint's tensors must fit the table
exactly anyway, which the caller checks). Torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from loratool.arch.registry import Family, Place, families, family, pattern_of
from loratool.io.jsontext import parse_json

UNKNOWN = "unknown"
_METADATA_ORDER = ("modelspec.architecture", "base_model_name_or_path", "ss_base_model_version", "ss_v2")


@dataclass(frozen=True)
class Detection:
    """What a file's family was decided from: ``evidence`` is ``("keys",)``, ``("metadata",)``,
    ``("keys", "metadata")`` (the keys left candidates, the metadata chose) or ``()`` (unknown)."""

    family: str
    evidence: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()  # families the keys could not tell apart (several only when ambiguous)
    metadata_family: str | None = None  # what the metadata says, when it names a family
    metadata_key: str | None = None
    variant: str | None = None  # the size variant the shapes fit (``14B``), for a family described by rules
    sizes: tuple[tuple[str, int], ...] = ()  # the sizes read off the shapes (rules families)

    @property
    def by(self) -> str:
        return "+".join(self.evidence) if self.evidence else "nothing"

    @property
    def ambiguous(self) -> bool:
        return len(self.candidates) > 1

    def to_json(self) -> dict:
        return {"family": self.family, "by": self.by, "candidates": list(self.candidates),
                "metadata_family": self.metadata_family, "metadata_key": self.metadata_key,
                "variant": self.variant, "sizes": dict(self.sizes)}

    def describe(self) -> str:
        """One line: ``flux (keys+metadata: modelspec.architecture; keys fit sd1, sdxl, flux, sd3)``."""
        parts = [self.by + (f": {self.metadata_key}" if "metadata" in self.evidence and self.metadata_key else "")]
        if self.ambiguous:
            parts.append(f"keys fit {', '.join(self.candidates)}: --arch chooses")
        if self.metadata_family and self.metadata_family != self.family and "keys" in self.evidence:
            parts.append(f"{self.metadata_key} says {self.metadata_family}")
        name = f"{self.family} {self.variant}" if self.variant else self.family
        return f"{name} ({'; '.join(parts)})"


# ---------------------------------------------------------------------- metadata

def _matches(value: str, prefixes: Sequence[str]) -> bool:
    parts = value.strip().lower().split("/")
    return any(part.startswith(p) for part in parts for p in prefixes)


def _metadata_values(metadata: Mapping[str, str], config: Mapping[str, object] | None) -> dict[str, str]:
    """The metadata values detection reads, ``base_model_name_or_path`` gathered from a peft config or a
    diffusers ``lora_adapter_metadata`` entry."""
    out = {k: str(metadata[k]) for k in _METADATA_ORDER if metadata.get(k)}
    found = [config.get("base_model_name_or_path")] if config else []
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            data = parse_json(raw)
        except ValueError:
            data = {}
        if isinstance(data, dict):
            found += [v for k, v in data.items() if k.endswith("base_model_name_or_path")]
    name = next((str(v) for v in found if v), None)
    if name and "base_model_name_or_path" not in out:
        out["base_model_name_or_path"] = name
    return out


def _match_length(value: str, prefixes: Sequence[str]) -> int:
    """The length of the longest prefix that names a part of ``value`` (0: none)."""
    parts = value.strip().lower().split("/")
    return max((len(p) for part in parts for p in prefixes if part.startswith(p)), default=0)


def metadata_votes(metadata: Mapping[str, str] | None, config: Mapping[str, object] | None = None
                   ) -> list[tuple[str, str]]:
    """(metadata key, family) for each key that names a family, most explicit first; per key, the family with
    the longest matching prefix (``flux.1-kontext`` is Kontext, not Flux)."""
    values = _metadata_values(metadata or {}, config)
    votes = []
    for key in _METADATA_ORDER:
        if key not in values:
            continue
        scored = [(_match_length(values[key], fam.metadata.get(key, ())), -i, fam.name)
                  for i, fam in enumerate(families())]
        best = max(scored, default=(0, 0, ""))
        if best[0]:
            votes.append((key, best[2]))
    return votes


def family_from_metadata(metadata: Mapping[str, str] | None, config: Mapping[str, object] | None = None
                         ) -> str | None:
    votes = metadata_votes(metadata, config)
    return votes[0][1] if votes else None


# ---------------------------------------------------------------------- adapters

Name = tuple[str, str, str]  # (style, scope, name) as a codec read it
Dims = tuple[int, int] | None  # (out, in · kernel) of the adapted weight, when the tensors tell


@dataclass
class _Fit:
    family: Family
    places: list[Place | None] = field(default_factory=list)
    level: int = 0


def _dims_match(shape: tuple[int, ...], dims: Dims) -> bool:
    return dims is None or (int(shape[0]), math.prod(int(s) for s in shape[1:])) == tuple(dims)


def _fit(fam: Family, names: Sequence[Name], dims: Sequence[Dims], table_only: bool = False) -> _Fit:
    resolve = fam.known_place if table_only else fam.resolve
    places = [resolve(style, scope, name) for style, scope, name in names]
    # a family whose sizes vary: its table at the sizes the shapes show; shapes fit exactly only at the sizes of
    # a real variant (a file at other widths, such as a tiny test model, fits by name)
    known_size = True
    if fam.rules and not table_only:
        fam = fam.sized({p.key: d for p, d in zip(places, dims, strict=True) if p is not None})
        known_size = fam.variant is not None or not fam.rules.get("variants")
    fit = _Fit(fam, places)
    exact = named = 0
    for place, d in zip(places, dims, strict=True):
        if place is None:
            continue
        shape = fam.shape(place.key)
        if shape is not None and _dims_match(shape, d) and known_size:
            exact += 1
        elif shape is not None or pattern_of(place.key) in fam.patterns:
            named += 1
    if names and exact == len(names):
        fit.level = 3
    elif names and exact + named == len(names):
        fit.level = 2
    elif 2 * (exact + named) > len(names):  # names most modules: the rest are strays, kept by generic rules
        fit.level = 1
    return fit


def _detection(fit: _Fit, *args, **kwargs) -> Detection:
    fam = fit.family
    return Detection(fam.name, *args, variant=fam.variant_label, sizes=tuple(sorted(fam.sizes.items())), **kwargs)


def detect_adapter(names: Sequence[Name], dims: Sequence[Dims], metadata: Mapping[str, str] | None = None,
                   config: Mapping[str, object] | None = None, *, forced: str | None = None
                   ) -> tuple[Detection, list[Place | None]]:
    """The family of an adapter's modules and where each module lands in it (None: the family has no name
    for it; the generic notion then keeps the name). ``forced``: the family the user named (``--arch``).

    A family that only metadata tells apart from another (``variant_of``: Flux Kontext from Flux) never competes
    on keys; it is chosen when the keys choose its base family and the metadata names it."""
    votes = metadata_votes(metadata, config)
    meta_family, meta_key = votes[0][1] if votes else None, votes[0][0] if votes else None
    if forced is not None:
        fit = _fit(family(forced), names, dims)
        return _detection(fit, ("user",), (fit.family.name,), meta_family, meta_key), _fill(fit, names)
    competing = [fam for fam in families() if fam.variant_of is None]
    fits = [_fit(fam, names, dims, table_only=True) for fam in competing]  # the tables first: cheap, and ...
    best = max((f.level for f in fits), default=0)
    if best < 3:  # ... when no table lists every module at its shape, the families' rules name the rest
        fits = [_fit(fam, names, dims) for fam in competing]
        best = max((f.level for f in fits), default=0)
    candidates = [f for f in fits if f.level == best and best > 0]
    if not candidates:
        fam = family(meta_family) if meta_family else family("generic")
        fit = _fit(fam, names, dims) if meta_family else _Fit(fam)
        evidence = ("metadata",) if meta_family else ()
        detection = _detection(fit, evidence, (), meta_family, meta_key) if meta_family else \
            Detection(UNKNOWN, evidence, (), meta_family, meta_key)
        return detection, _fill(fit, names)
    names_of = [f.family.name for f in candidates]
    chosen, evidence = candidates[0], ("keys",)
    if len(candidates) > 1:
        for key, fam_name in votes:
            if fam_name in names_of:
                chosen, evidence, meta_family, meta_key = candidates[names_of.index(fam_name)], ("keys", "metadata"), \
                    fam_name, key
                break
    for key, fam_name in votes:  # a family told apart from the chosen one by metadata alone
        if family(fam_name).variant_of == chosen.family.name:
            chosen, evidence, meta_family, meta_key = _fit(family(fam_name), names, dims), ("keys", "metadata"), \
                fam_name, key
            break
    if chosen.family.rules and chosen.family.variant is None:
        # chosen on its default table (or at no real variant's sizes): its variant is the one the file's shapes
        # fit (a Wan 14B LoRA without k_img/v_img is 14B, though the default 14B-I2V table lists its modules too)
        chosen = _fit(chosen.family, names, dims)
    ordered = (chosen.family.name, *[n for n in names_of if n != chosen.family.name])
    return _detection(chosen, evidence, ordered, meta_family, meta_key), _fill(chosen, names)


def _fill(fit: _Fit, names: Sequence[Name]) -> list[Place | None]:
    """The family's places, and the generic notion's for the names it has none for."""
    places = list(fit.places) or [None] * len(names)
    if any(p is None for p in places):
        generic = family("generic")
        places = [p if p is not None else generic.resolve(*n) for p, n in zip(places, names, strict=True)]
    return places


# ---------------------------------------------------------------------- checkpoints

_CROSS = re.compile(r"(^|\.)(transformer_blocks\.0\.attn2\.to_k\.weight)$")
_TE_Q = re.compile(r"encoder\.layers\.0\.self_attn\.q_proj\.weight$")


def detect_checkpoint(keys_and_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
                      metadata: Mapping[str, str] | None = None) -> Detection:
    """The family of a single-file checkpoint or a diffusers folder's keys (LDM/SGM/BFL/MMDiT names, with
    or without ``model.diffusion_model.``; a diffusers component, or a pipeline's keys prefixed by component).

    Stages: names only one family has (entries' ``checkpoint_keys``); the width of the first cross-attention
    (a width no family has, such as the SDXL refiner's 1280, is unknown); UNet and text-encoder names
    (``checkpoint_names``); a lone CLIP encoder by its width."""
    items = keys_and_shapes.items() if isinstance(keys_and_shapes, Mapping) else keys_and_shapes
    shapes = {k: tuple(s) for k, s in items}
    meta = family_from_metadata(metadata)
    key_meta = metadata_votes(metadata)[0][0] if meta else None

    def found(name: str) -> Detection:
        return Detection(name, ("keys",) if name != UNKNOWN else (), (name,) if name != UNKNOWN else (), meta,
                         key_meta)

    joined, seen = "\n".join(shapes), {}  # fragments hold no newline: a search of all names at once

    def has(parts: Sequence[str]) -> bool:
        key = tuple(parts)
        if key not in seen:  # most fragments are in no name: the joined search answers at once
            seen[key] = (not key or key[0] in joined) and any(all(p in k for p in key) for k in shapes)
        return seen[key]

    for stage in ("checkpoint_keys", "cross_attention", "checkpoint_names", "text_encoder_width"):
        if stage in ("cross_attention", "text_encoder_width"):
            pattern = _CROSS if stage == "cross_attention" else _TE_Q
            for key, shape in shapes.items():
                if pattern.search(key) and len(shape) == 2:
                    width = {int(f.entry[stage]): f.name for f in families() if stage in f.entry}
                    return found(width.get(shape[1], UNKNOWN))
            continue
        for fam in families():  # each alternative: fragment lists that keys of the file must each contain
            if any(all(has(parts) for parts in alt) for alt in fam.entry.get(stage, ())) and \
                    not any(has([part]) for part in fam.entry.get("checkpoint_not", ())):
                if not fam.rules:
                    return found(fam.name)
                sized = checkpoint_family(fam, shapes)
                return Detection(fam.name, ("keys",), (fam.name,), meta, key_meta, sized.variant_label,
                                 tuple(sorted(sized.sizes.items())))
    return found(UNKNOWN)


_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")


def checkpoint_family(fam: Family, shapes: Mapping[str, Sequence[int]]) -> Family:
    """A family described by rules at the sizes a checkpoint's weights show (single-file names with or without
    ``model.diffusion_model.``, or diffusers names); the family itself otherwise."""
    if not fam.rules:
        return fam
    dims: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        prefix = next(p for p in _CHECKPOINT_PREFIXES if key.startswith(p))
        name = key[len(prefix):].removesuffix(".weight")
        place = fam.resolve("original", "diffusion_model", name) or fam.resolve("diffusers", "", name)
        if place is not None and place.component == fam.denoiser:
            dims[place.key] = tuple(shape)
    return fam.sized(dims)


def detect_embeddings(keys: Iterable[str], widths: Iterable[int], metadata: Mapping[str, str] | None = None
                      ) -> Detection:
    """The family of a textual-inversion file: its key names (SDXL's ``clip_g``), else its vectors' width
    (a lone CLIP: 768 SD1, 1024 SD2)."""
    keys, widths = set(keys), list(widths)
    votes = metadata_votes(metadata)
    meta, said = (votes[0][1], votes[0][0]) if votes else (None, None)
    for fam in families():
        if keys & set(fam.entry.get("embedding_keys", ())):
            return Detection(fam.name, ("keys",), (fam.name,), meta, said)
    by_width = {int(f.entry["text_encoder_width"]): f.name for f in families() if "text_encoder_width" in f.entry}
    for width in widths:
        if width in by_width:
            return Detection(by_width[width], ("keys",), (by_width[width],), meta, said)
    return Detection(meta, ("metadata",), (), meta, said) if meta else Detection(UNKNOWN)


def detect_arch_from_checkpoint(
    keys_and_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
) -> str:
    """sd1 | sd2 | sdxl | flux | sd3 | unknown (:func:`detect_checkpoint`'s family)."""
    return detect_checkpoint(keys_and_shapes).family


def detect_layout_from_checkpoint(keys: Iterable[str]) -> str:
    """sd1 | sd2 | sdxl | unknown by key names alone: the one architecture whose table names every key of
    the file (its single-file keys and known extras); none, or more than one (a file of UNet keys only), is
    unknown.

    Widths play no part, so this names the layout of a file built at other widths (a tiny test model in
    SD1's block structure) or one with tensors missing; use it only where every tensor is checked against
    something else (training fills models built from a config, strictly, and names what is missing).
    Real files go through detect_arch_from_checkpoint, which reads the widths."""
    keys = set(keys)
    fits = []
    for fam in families():
        table = fam.table
        if table is None or fam.denoiser != "unet":
            continue
        ours = keys & set(table.checkpoint_params)
        if ours and all(table.is_checkpoint_extra(k) for k in keys - ours):
            fits.append(fam.name)
    return fits[0] if len(fits) == 1 else UNKNOWN
