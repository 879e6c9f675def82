"""``read_adapter(path) -> Adapter``: any recognised input, in canonical form.

The steps: open the input (``source.py``), sort its keys per key (``detect.py``/``keys.py``: layout, module
name as written, role), ask the family registry which family the names, shapes and metadata point to and
where each module lands (``loratool.arch.detect_adapter``), group tensors by module, build module objects
(``build.py``), take alpha from wherever the layout keeps it (kohya ``.alpha`` tensors, peft
``adapter_config.json``, diffusers ``lora_adapter_metadata``), and apply the family's shape facts (LyCORIS
flat convs, 1x1 convs stored as matrices, XLabs' single-block q/k/v). Keys that fit nothing are listed in
``Adapter.unknown`` with a reason, never dropped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import replace

import torch

from loratool.arch import Detection, Family, Place, detect_adapter, family
from loratool.core.modules import Adapter, LohaModule, LokrModule, LoraModule, Module
from loratool.errors import LoraToolError, examples
from loratool.formats import special
from loratool.formats.build import Group, GroupError, build_module, swap_halves
from loratool.formats.detect import detect_keys, unknown_reason
from loratool.formats.fuse import split_lora
from loratool.formats.keys import KeyRef
from loratool.formats.peftcfg import AlphaSource, alpha_source_from_config, alpha_source_from_metadata
from loratool.formats.placing import placed_modules, source_format, stored_layout
from loratool.formats.source import RawSource, open_raw

_SWAPPED_ROLES = ("up", "bias", "diff_b")


def read_adapter(path: str | os.PathLike[str], arch: str | None = None) -> Adapter:
    """Read any adapter file or folder that detection recognises into the canonical model
    (``arch``: the family, when the user names it; otherwise keys and metadata decide)."""
    raw = open_raw(path)
    adapter = _read_parts(raw, arch) if raw.parts else read_raw(raw, arch=arch)
    adapter.path = os.fspath(path)
    return adapter


def require_complete(adapter: Adapter, path: str | os.PathLike[str] | None = None) -> None:
    """Refuse an adapter whose input had tensors that form no module (``Adapter.unknown``: a broken
    module, a kind no layout reads): an op or a write would drop them without a word. One line: how many,
    and the first two reasons, each with a tensor it concerns. (``convert --drop-unknown`` leaves them out on
    purpose, and says so.)"""
    if not adapter.unknown:
        return
    by_reason: dict[str, list[str]] = {}
    for key in adapter.unknown:
        by_reason.setdefault(adapter.unknown_reasons.get(key, "no layout recognises this key"), []).append(key)
    shown = [f"{why} ({examples(keys, 1)})" for why, keys in list(by_reason.items())[:2]]
    more = f"; and {len(by_reason) - 2} more reasons" if len(by_reason) > 2 else ""
    raise LoraToolError(f"{len(adapter.unknown)} tensor(s) form no module this command can handle and would "
                        f"be lost: {'; '.join(shown)}{more}", path or adapter.path or None)


def decode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
           config: Mapping[str, object] | None = None, component: str | None = None,
           arch: str | None = None) -> Adapter:
    """The canonical adapter of in-memory tensors (+ metadata, + a peft config): ``read_adapter`` without files."""
    raw = RawSource("<memory>", {k: (lambda t=t: t) for k, t in tensors.items()},
                    {k: tuple(t.shape) for k, t in tensors.items()}, dict(metadata or {}),
                    dict(config) if config is not None else None)
    return read_raw(raw, component, arch)


# network-wide flags some musubi-tuner networks save beside the modules (the Blissful-tuner fork's LoRANetwork
# buffers): rsLoRA scaling alpha/√r for every module, and whether DoRA magnitudes (``.dora_layer.weight``) are in
NETWORK_FLAGS = ("use_rslora_flag", "use_dora_flag")


def read_raw(raw: RawSource, component: str | None = None, arch: str | None = None) -> Adapter:
    flags = {k: bool(raw.get(k).reshape(-1)[0]) for k in NETWORK_FLAGS if raw.shapes.get(k, (0,)) in ((), (1,))}
    report = detect_keys({k: s for k, s in raw.shapes.items() if k not in flags}, raw.metadata)
    if report.special:
        adapter = special.read_special(raw, report.special)
        adapter.metadata = dict(raw.metadata)
        if adapter.modules:
            adapter.detection = detect_modules(adapter.modules, raw.metadata, raw.config, arch)
            adapter.base_model = adapter.detection.family
        return adapter
    adapter = Adapter(metadata=dict(raw.metadata))
    for key in report.unknown:
        _note_unknown(adapter, [key], unknown_reason(key))
    refs = {k: replace(r, scope=component) if component and r.layout == "peft" else r for k, r in report.refs.items()}
    written: dict[tuple[str, str, str], dict[str, str]] = {}
    for key in sorted(refs):
        roles = written.setdefault(refs[key].module_id, {})
        if refs[key].role in roles:
            _note_unknown(adapter, [key], f"same tensor as {roles[refs[key].role]} (two spellings of one module)")
            continue
        roles[refs[key].role] = key
    ids = list(written)
    from loratool.formats.keys import weight_dims

    dims = [weight_dims({role: raw.shapes[k] for role, k in written[i].items()}) for i in ids]
    detection, places = detect_adapter(ids, dims, raw.metadata, raw.config, forced=arch)
    fam = family(detection.family if detection.family != "unknown" else "generic")
    if detection.sizes:
        fam = fam.at(dict(detection.sizes), detection.variant)
    groups, origin, layouts = _group(raw, refs, written, places, adapter, fam)
    alphas = _alpha_source(raw)
    for key, group in groups.items():
        comp, _, path = key.partition(".")
        try:
            module = build_module(comp, path, group)
        except GroupError as e:
            _note_unknown(adapter, origin[key], f"{key}: {e}")
            continue
        if alphas is not None and isinstance(module, LoraModule) and "alpha" not in group:
            alphas.apply(module)
        if flags.get("use_rslora_flag") and isinstance(module, LoraModule) and module.alpha is not None:
            module.rslora = True
        adapter.add(module)
    adapter.base_model, adapter.detection = detection.family, detection
    adapter.source_format = source_format({layouts[k] for k in adapter.modules}, adapter, fam)
    family_shapes(adapter, fam)
    return adapter


def _group(raw: RawSource, refs: dict[str, KeyRef], written: dict, places: list[Place | None], adapter: Adapter,
           fam: Family):
    groups: dict[str, Group] = {}
    origin: dict[str, list[str]] = {}
    layouts: dict[str, str] = {}
    for place, keys, first in placed_modules(refs, written, places, lambda k, why: _note_unknown(adapter, k, why)):
        group = groups.setdefault(place.key, {})
        for role, key in keys.items():
            if role in group:
                was = next(k for k in origin[place.key] if refs[k].role == role)
                _note_unknown(adapter, [key], f"same tensor as {was} (two spellings of one module)")
                continue
            tensor = raw.get(key)
            if place.swapped and role in _SWAPPED_ROLES:
                tensor = swap_halves(tensor)
            group[role] = tensor
            origin.setdefault(place.key, []).append(key)
        layouts.setdefault(place.key, stored_layout(first, place, fam))
    return groups, origin, layouts


def _alpha_source(raw: RawSource) -> AlphaSource | None:
    if raw.config is not None:
        return alpha_source_from_config(raw.config, raw.path)
    return alpha_source_from_metadata(raw.metadata, raw.path)


def _note_unknown(adapter: Adapter, keys: list[str], reason: str) -> None:
    for key in keys:
        if key not in adapter.unknown:
            adapter.unknown.append(key)
        adapter.unknown_reasons[key] = reason


def detect_modules(modules: Mapping[str, Module], metadata: Mapping[str, str] | None = None,
                   config: Mapping[str, object] | None = None, arch: str | None = None) -> Detection:
    """The family of modules already in canonical form (layouts that carry no names of their own)."""
    names = [("diffusers", m.component, m.path) for m in modules.values()]
    dims = [(int(m.weight_shape[0]), math.prod(int(s) for s in m.weight_shape[1:])) for m in modules.values()]
    return detect_adapter(names, dims, metadata, config, forced=arch)[0]


def family_shapes(adapter: Adapter, fam: Family) -> None:
    """The family's shape facts: XLabs' single-block q/k/v split, LyCORIS flat convs, 1x1 convs as matrices."""
    parts_of = getattr(fam.naming, "xlabs_parts", None)
    for key, m in list(adapter.modules.items()):
        parts = parts_of(m.path, int(m.weight_shape[0])) if parts_of and isinstance(m, LoraModule) else None
        if parts:
            del adapter.modules[key]
            for part in split_lora(m, [(f"{m.component}.{p}", rows) for p, rows in parts]):
                adapter.add(part)
    for m in adapter.modules.values():
        shape = fam.shape(m.key)
        if shape is None or math.prod(shape) != math.prod(m.weight_shape):
            continue
        if isinstance(m, (LokrModule, LohaModule)) and not m.shape and shape != m.weight_shape:
            m.shape = shape  # LyCORIS stores conv factors flat: the table gives the 4-D shape
        elif isinstance(m, LoraModule) and m.down.dim() == 2 and m.mid is None:
            _as_1x1_conv(m, shape)


def _as_1x1_conv(m: LoraModule, shape: tuple[int, ...]) -> None:
    """A 1x1 conv layer's LoRA stored as matrices becomes conv-shaped factors (views of the same data)."""
    if len(shape) != 4 or shape[2:] != (1, 1) or m.weight_shape != shape[:2]:
        return
    m.down = m.down.reshape(*m.down.shape, 1, 1)
    m.up = m.up.reshape(*m.up.shape, 1, 1)
    if m.dora is not None:
        m.dora.magnitude = m.dora.magnitude.reshape(*m.dora.magnitude.shape, 1, 1)


def _read_parts(raw: RawSource, arch: str | None) -> Adapter:
    out = Adapter(source_format="peft")
    for comp, part in raw.parts:
        a = read_raw(part, component=comp, arch=arch)
        for m in a.modules.values():
            out.add(m)
        out.unknown.extend(a.unknown)
        out.unknown_reasons.update(a.unknown_reasons)
        out.metadata.update(a.metadata)
    configs = [p.config for _, p in raw.parts if p.config]
    out.detection = detect_modules(out.modules, out.metadata, configs[0] if configs else None, arch)
    out.base_model = out.detection.family
    return out
