"""The header-only decode: what an adapter file holds, from its keys, shapes, dtypes and metadata. Torch-free.

``read_shapes(path)`` runs the reader's steps (``read.py``) on the header alone: every key split into layout,
module name and role (``keys.py``), the family and each module's place from the registry
(``loratool.arch.detect_adapter``), alpha from the ``.alpha`` scalars (a few bytes each), a peft config or
diffusers' ``lora_adapter_metadata``. Each module becomes a :class:`ModuleShape`: its kind, the shape of every
stored tensor, the layer's weight shape, rank, alpha and scale, with the same properties as a canonical module
(``loratool.core.modules``) but no tensor. ``inspect`` and ``ratio FILE`` need nothing more, so they never
import torch.

Files whose understanding needs tensor values or the tensor codecs' checks are left to ``read_adapter``:
pickles, layouts whose keys carry no module names (cloneofsimo, textual inversion), XLabs' split projections,
DoRA magnitudes (their axis is checked against the weight), and a module whose tensors form no known kind
(the reader lists it as unknown, with the reason). ``read_shapes`` returns None for those, and
:func:`read_summary` falls back to the full read.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from loratool.arch import Detection, Place, detect_adapter, family
from loratool.core.module_set import ModuleSet
from loratool.errors import LoraToolError
from loratool.formats.detect import detect_keys, unknown_reason
from loratool.formats.keys import KeyRef, weight_dims
from loratool.formats.placing import placed_modules, source_format, stored_layout

if TYPE_CHECKING:
    from loratool.core.modules import Adapter
    from loratool.io.sources import TensorSource

FACTORS = {"lora": ("down", "up", "mid"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
           "hada_t2"), "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
           "full": ("diff", "diff_b"), "norm": ("w_norm", "b_norm")}
_BIAS = ("bias", "diff_b", "b_norm")
_SCALAR = {"F16": "<e", "F32": "<f", "F64": "<d", "I8": "<b", "U8": "<B", "I16": "<h", "I32": "<i", "I64": "<q"}


class NeedsTensors(Exception):
    """The header alone cannot say what the reader would (``read_adapter`` decides)."""


@dataclass(frozen=True)
class TensorShape:
    """A stored tensor as its header describes it."""

    shape: tuple[int, ...]
    dtype: str  # the safetensors name (F16, BF16, F32, ...)

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class StoredMagnitude:
    magnitude: TensorShape


@dataclass
class ModuleShape:
    """One adapted layer without its tensors: the properties ``inspect`` and ``ratio`` read of a module."""

    component: str
    path: str
    kind: str  # lora, loha, lokr, full, norm
    parts: dict[str, TensorShape]  # role -> stored tensor (alpha excluded)
    alpha: float | None = None
    rslora: bool = False
    shape: tuple[int, ...] = ()  # the layer's weight shape where the factors do not pin it (the family's table)

    @property
    def key(self) -> str:
        return f"{self.component}.{self.path}" if self.component else self.path

    @property
    def rank(self) -> int | None:
        p = self.parts
        if self.kind == "lora":
            return p["down"].shape[0]
        if self.kind == "loha":
            return p["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            side = p.get("lokr_w1_b") or p.get("lokr_w2_b")
            return None if side is None else side.shape[0]
        return None

    @property
    def scale(self) -> float:
        rank = self.rank
        if self.alpha is None or rank is None:
            return 1.0
        return self.alpha / (math.sqrt(rank) if self.rslora and self.kind == "lora" else rank)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.shape:
            return tuple(self.shape)
        return _weight_shape(self.kind, {r: t.shape for r, t in self.parts.items()})

    @property
    def is_conv(self) -> bool:
        return self.kind != "norm" and len(self.weight_shape) == 4

    @property
    def dora(self) -> StoredMagnitude | None:
        return None  # DoRA files are read whole (read_shapes leaves them to read_adapter)

    @property
    def bias(self) -> TensorShape | None:
        return next((self.parts[r] for r in _BIAS if r in self.parts), None)

    def tensors(self) -> list[TensorShape]:
        return [self.parts[r] for r in FACTORS[self.kind] if r in self.parts]


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _weight_shape(kind: str, s: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """A layer's weight shape from its factors' shapes (as ``core.modules`` builds it from the tensors)."""
    if kind == "lora":
        down, mid = s["down"], s.get("mid")
        if len(down) == 2:
            return (s["up"][0], down[1])
        return (s["up"][0], down[1], *(mid[2:] if mid is not None else down[2:]))
    if kind == "loha":
        if "hada_t1" in s:
            return (s["hada_w1_a"][1], s["hada_w1_b"][1], *s["hada_t1"][2:])
        return (s["hada_w1_a"][0], _flat(s["hada_w1_b"])[1])
    if kind == "lokr":
        w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_w2" in s:
            w2 = s["lokr_w2"]
        elif "lokr_t2" in s:
            w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1], *s["lokr_t2"][2:])
        else:
            w2 = (s["lokr_w2_a"][0], _flat(s["lokr_w2_b"])[1])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    return tuple(s["diff" if kind == "full" else "w_norm"])


def module_kind(roles: set[str]) -> str:
    """The kind a module's roles make, when they make one cleanly; else :class:`NeedsTensors` (the reader
    says what is wrong, or checks what only the tensors can tell)."""
    if roles & {"dora_scale", "magnitude"}:
        raise NeedsTensors("DoRA")
    if {"down", "up"} <= roles and roles <= {"down", "up", "mid", "alpha", "bias", "diff_b"}:
        return "lora"
    for kind in ("loha", "lokr"):
        if roles and roles - {"alpha"} <= set(FACTORS[kind]) and _complete(kind, roles):
            return kind
    if "diff" in roles and roles <= {"diff", "diff_b", "alpha"}:
        return "full"
    if "w_norm" in roles and roles <= {"w_norm", "b_norm", "alpha"}:
        return "norm"
    raise NeedsTensors("no clean kind")


def _complete(kind: str, roles: set[str]) -> bool:
    if kind == "loha":
        return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles
    side1 = "lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles
    side2 = "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles
    return side1 and side2 and not ("lokr_w1" in roles and "lokr_w1_a" in roles)


@dataclass
class AdapterShapes(ModuleSet):
    """A whole adapter file without its tensors: the fields of ``core.modules.Adapter`` that a header gives."""

    modules: dict[str, ModuleShape] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    base_model: str = "unknown"
    source_format: str | list[str] = ""
    unknown: list[str] = field(default_factory=list)
    unknown_reasons: dict[str, str] = field(default_factory=dict)
    detection: Detection | None = None
    embeddings: dict[str, Any] = field(default_factory=dict)  # always empty: embedding layouts are read whole

    def add(self, module: ModuleShape) -> None:
        self.modules[module.key] = module

    def note_unknown(self, keys: list[str], reason: str) -> None:
        for key in keys:
            if key not in self.unknown:
                self.unknown.append(key)
            self.unknown_reasons[key] = reason


# -- reading -----------------------------------------------------------------------------------


class _Header:
    """The header facts of one input (one peft component, or the whole file): keys with shapes and dtypes,
    metadata, the peft config, and alpha scalars read as bytes."""

    def __init__(self, source: TensorSource, where: str, keys: list[str], strip: str = "",
                 config: dict | None = None):
        self.source, self.where, self.strip, self.config = source, where, strip, config
        self.shapes = {k[len(strip):]: tuple(source.shape(k)) for k in keys}
        self.metadata = dict(source.metadata or {})
        self._files: dict[str, Any] = {}

    def tensor(self, key: str) -> TensorShape:
        return TensorShape(self.shapes[key], self.source.dtype_name(self.strip + key))

    def scalar(self, key: str) -> float:
        """A one-element tensor's value, decoded from its bytes (an alpha)."""
        from loratool.io.safetensors import SafetensorsFile

        path, inner = self.source.location(self.strip + key)
        f = self._files.get(path) or self._files.setdefault(path, SafetensorsFile(path))
        info = f.info(inner)
        if info.numel != 1 or (info.dtype not in _SCALAR and info.dtype != "BF16"):
            raise NeedsTensors(key)
        raw = f.read_bytes(info.begin, info.nbytes)
        if info.dtype == "BF16":  # the upper half of a float32
            return float(struct.unpack("<f", b"\0\0" + raw)[0])
        return float(struct.unpack(_SCALAR[info.dtype], raw)[0])

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def read_shapes(path: str | os.PathLike[str], arch: str | None = None) -> AdapterShapes | None:
    """The adapter at ``path`` from its header alone, or None when the full reader must decide (see the
    module docstring). Bad files raise the same one-line errors as ``read_adapter``."""
    from loratool.io.sources import open_source

    p = os.fspath(path)
    if not os.path.exists(p):
        raise LoraToolError("no such file", p)
    src = open_source(p)
    try:
        if src.kind in ("diffusers", "component"):
            raise LoraToolError("this is a model folder, not an adapter", p)
        if not _all_safetensors(src):
            return None  # pickles: torch reads them
        if src.kind == "peft" and src.components:
            parts = [(comp, _Header(src, src.path, [f"{comp}.{k}" for k in keys], f"{comp}.", src.config.get(comp)))
                     for comp, keys in src.components.items()]
            return _read_parts(parts, arch)
        header = _Header(src, p, list(src.keys()), config=src.config if src.kind == "peft" else None)
        try:
            return _read_header(header, arch=arch)
        finally:
            header.close()
    except NeedsTensors:
        return None
    finally:
        src.close()


def _all_safetensors(src: TensorSource) -> bool:
    from loratool.io.safetensors import is_safetensors_path, looks_like_safetensors

    files = {src.location(k)[0] for k in src.keys()} or {src.path}
    return all(os.path.isfile(f) and (is_safetensors_path(f) or looks_like_safetensors(f)) for f in files)


def read_summary(path: str | os.PathLike[str], arch: str | None = None) -> AdapterShapes | Adapter:
    """The header-only adapter where the header tells everything, else the full canonical adapter
    (``read_adapter``, which imports torch)."""
    found = read_shapes(path, arch)
    if found is not None:
        return found
    from loratool.formats.read import read_adapter

    return read_adapter(path, arch)


def _read_header(header: _Header, component: str | None = None, arch: str | None = None) -> AdapterShapes:
    report = detect_keys(header.shapes, header.metadata)
    if report.special:
        raise NeedsTensors(report.special)
    adapter = AdapterShapes(metadata=dict(header.metadata))
    for key in report.unknown:
        adapter.note_unknown([key], unknown_reason(key))
    refs = {k: replace(r, scope=component) if component and r.layout == "peft" else r for k, r in report.refs.items()}
    if any(r.layout == "xlabs" for r in refs.values()):
        raise NeedsTensors("xlabs")
    written: dict[tuple[str, str, str], dict[str, str]] = {}
    for key in sorted(refs):
        roles = written.setdefault(refs[key].module_id, {})
        if refs[key].role in roles:
            adapter.note_unknown([key], f"same tensor as {roles[refs[key].role]} (two spellings of one module)")
            continue
        roles[refs[key].role] = key
    dims = [weight_dims({role: header.shapes[k] for role, k in roles.items()}) for roles in written.values()]
    detection, places = detect_adapter(list(written), dims, header.metadata, header.config, forced=arch)
    fam = family(detection.family if detection.family != "unknown" else "generic")
    layouts = _place(header, refs, written, places, adapter, fam)
    alphas = _alpha_source(header)
    for m in adapter.modules.values():
        if alphas is not None and m.kind == "lora" and m.alpha is None:
            alphas.apply(m)
        table_shape = fam.shape(m.key)
        if table_shape is not None and _takes_table_shape(m, table_shape):
            m.shape = table_shape
    adapter.base_model, adapter.detection = detection.family, detection
    adapter.source_format = source_format({layouts[k] for k in adapter.modules}, adapter, fam)
    return adapter


def _place(header: _Header, refs: dict[str, KeyRef], written: dict, places: list[Place | None],
           adapter: AdapterShapes, fam) -> dict[str, str]:
    """Each module's record at its place (as the reader groups tensors); returns module key -> layout."""
    roles_at: dict[str, dict[str, str]] = {}
    layouts: dict[str, str] = {}
    for place, keys, first in placed_modules(refs, written, places, adapter.note_unknown):
        group = roles_at.setdefault(place.key, {})
        for role, key in keys.items():
            if role in group:
                adapter.note_unknown([key], f"same tensor as {group[role]} (two spellings of one module)")
                continue
            group[role] = key
        layouts.setdefault(place.key, stored_layout(first, place, fam))
    for key, group in roles_at.items():
        comp, _, path = key.partition(".")
        kind = module_kind(set(group))
        parts = {role: header.tensor(k) for role, k in group.items() if role != "alpha"}
        if kind == "lora" and parts["up"].shape[1:2] != parts["down"].shape[:1] and "mid" not in parts:
            raise NeedsTensors("rank mismatch")
        if any(0 in p.shape for p in parts.values()):
            raise NeedsTensors("an empty factor")  # the reader names what is wrong with such modules
        if kind == "lora" and len(parts["up"].shape) == 4 and parts["up"].shape[2:] != (1, 1):
            raise NeedsTensors("a kxk up factor")
        alpha = header.scalar(group["alpha"]) if "alpha" in group else None
        if alpha is not None and not math.isfinite(alpha):
            raise NeedsTensors("a non-finite alpha")
        adapter.add(ModuleShape(comp, path, kind, parts, alpha))
    return layouts


def _takes_table_shape(m: ModuleShape, shape: tuple[int, ...]) -> bool:
    """The family's shape facts the reader applies: LyCORIS flat convs get the table's 4-D shape, a 1x1
    conv's LoRA stored as matrices becomes conv-shaped."""
    own = m.weight_shape
    if math.prod(shape) != math.prod(own) or shape == own:
        return False
    if m.kind in ("loha", "lokr"):
        return True
    return (m.kind == "lora" and m.parts["down"].dim() == 2 and "mid" not in m.parts and len(shape) == 4
            and shape[2:] == (1, 1) and own == shape[:2])


def _alpha_source(header: _Header):
    from loratool.formats.peftcfg import alpha_source_from_config, alpha_source_from_metadata

    if header.config is not None:
        return alpha_source_from_config(header.config, header.where)
    return alpha_source_from_metadata(header.metadata, header.where)


def _read_parts(parts: list[tuple[str, _Header]], arch: str | None) -> AdapterShapes:
    out = AdapterShapes(source_format="peft")
    for comp, header in parts:
        try:
            part = _read_header(header, component=comp, arch=arch)
        finally:
            header.close()
        out.modules.update(part.modules)
        out.unknown.extend(part.unknown)
        out.unknown_reasons.update(part.unknown_reasons)
        out.metadata.update(part.metadata)
    configs = [h.config for _, h in parts if h.config]
    names = [("diffusers", m.component, m.path) for m in out.modules.values()]
    dims = [_flat(m.weight_shape) for m in out.modules.values()]
    out.detection = detect_adapter(names, dims, out.metadata, configs[0] if configs else None, forced=arch)[0]
    out.base_model = out.detection.family
    return out
