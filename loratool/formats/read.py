"""``read_adapter(path) -> Adapter``: any recognised input, in canonical form.

The steps: open the input (``source.py``), sort its keys per key (``detect.py``), group tensors by
module, build module objects (``build.py``), take alpha from wherever the layout keeps it (kohya
``.alpha`` tensors, peft ``adapter_config.json``, diffusers ``lora_adapter_metadata``), detect the
base model, and apply the few base-dependent fixes (T5 encoder component, LyCORIS shapes).
Keys that fit nothing are listed in ``Adapter.unknown`` with a reason, never dropped.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping

import torch

from loratool.core.modules import Adapter, LohaModule, LokrModule, LoraModule
from loratool.formats import archinfo, flux, special
from loratool.formats.build import Group, GroupError, build_module
from loratool.formats.detect import detect_base_model, detect_keys, unknown_reason
from loratool.formats.keys import KeyRef, place
from loratool.formats.peftcfg import (
    AlphaSource,
    alpha_source_from_config,
    alpha_source_from_metadata,
    peft_component,
)
from loratool.formats.source import RawSource, open_raw


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read any adapter file or folder that detection recognises into the canonical model."""
    raw = open_raw(path)
    if raw.parts:
        return _read_parts(raw)
    return read_raw(raw)


def decode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
           config: Mapping[str, object] | None = None, component: str | None = None) -> Adapter:
    """The canonical adapter of in-memory tensors (+ metadata, + a peft config): ``read_adapter`` without files."""
    raw = RawSource("<memory>", {k: (lambda t=t: t) for k, t in tensors.items()},
                    {k: tuple(t.shape) for k, t in tensors.items()}, dict(metadata or {}),
                    dict(config) if config is not None else None)
    return read_raw(raw, component)


def read_raw(raw: RawSource, component: str | None = None) -> Adapter:
    report = detect_keys(raw.shapes, raw.metadata)
    if report.special:
        adapter = special.read_special(raw, report.special)
        adapter.metadata = dict(raw.metadata)
        return adapter
    adapter = Adapter(metadata=dict(raw.metadata))
    for key in report.unknown:
        _note_unknown(adapter, [key], unknown_reason(key))
    refs = report.refs
    if any(r.family == "peft" for r in refs.values()):  # base_model.model.<path>: the model it adapts
        comp = component or peft_component([r.path for r in refs.values() if r.family == "peft"])
        refs = {k: _with_component(r, comp) if r.family == "peft" else r for k, r in refs.items()}
    groups, origin = _group(raw, refs, adapter)
    alphas = _alpha_source(raw, refs)
    for (comp, path), group in groups.items():
        try:
            module = build_module(comp, path, group)
        except GroupError as e:
            _note_unknown(adapter, origin[(comp, path)], f"{comp}.{path}: {e}")
            continue
        if alphas is not None and isinstance(module, LoraModule) and "alpha" not in group:
            alphas.apply(module)
        adapter.add(module)
    flux.finish_read(adapter)
    adapter.base_model = detect_base_model(adapter.modules)
    _base_fixes(adapter)
    adapter.source_format = _source_format(refs, adapter, raw)
    return adapter


def _with_component(ref: KeyRef, comp: str) -> KeyRef:
    c, p, swap = place(comp, ref.path)
    return KeyRef(ref.family, c, p, ref.role, swap)


def _group(raw: RawSource, refs: dict[str, KeyRef], adapter: Adapter):
    groups: dict[tuple[str, str], Group] = defaultdict(dict)
    origin: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key in sorted(refs):
        ref = refs[key]
        where = (ref.component, ref.path)
        if ref.role in groups[where]:
            first = next(k for k in origin[where] if refs[k].role == ref.role)
            _note_unknown(adapter, [key], f"same tensor as {first} (two spellings of one module)")
            continue
        tensor = raw.get(key)
        if ref.swap and ref.role in ("up", "bias"):
            tensor = flux.swap_halves(tensor)
        groups[where][ref.role] = tensor
        origin[where].append(key)
    return groups, origin


def _alpha_source(raw: RawSource, refs: dict[str, KeyRef]) -> AlphaSource | None:
    if raw.config is not None:
        return alpha_source_from_config(raw.config, raw.path)
    return alpha_source_from_metadata(raw.metadata, raw.path)


def _note_unknown(adapter: Adapter, keys: list[str], reason: str) -> None:
    for key in keys:
        if key not in adapter.unknown:
            adapter.unknown.append(key)
        adapter.unknown_reasons[key] = reason


def _base_fixes(adapter: Adapter) -> None:
    """Base-dependent naming: the T5 encoder's component, LyCORIS shapes from the architecture."""
    if adapter.base_model in ("flux", "sd3"):
        t5 = "text_encoder_2" if adapter.base_model == "flux" else "text_encoder_3"
        moved = {}
        for key, m in list(adapter.modules.items()):
            if m.component.startswith("text_encoder") and m.path.startswith("encoder.block.") and m.component != t5:
                del adapter.modules[key]
                m.component = t5
                moved[m.key] = m
        adapter.modules.update(moved)
    for m in adapter.modules.values():
        if isinstance(m, (LokrModule, LohaModule)) and not m.shape:
            current = m.weight_shape  # LyCORIS stores conv factors flat: the table gives the 4-D shape
            shape = archinfo.shape_for(adapter.base_model, m.key, math.prod(current))
            if shape is not None and shape != current:
                m.shape = shape
        elif isinstance(m, LoraModule) and m.down.dim() == 2 and m.mid is None:
            _as_1x1_conv(m, archinfo.shape_for(adapter.base_model, m.key, math.prod(m.weight_shape)))


def _as_1x1_conv(m: LoraModule, shape: tuple[int, ...] | None) -> None:
    """A 1x1 conv layer's LoRA stored as matrices becomes conv-shaped factors (views of the same data)."""
    if shape is None or len(shape) != 4 or shape[2:] != (1, 1) or m.weight_shape != shape[:2]:
        return
    m.down = m.down.reshape(*m.down.shape, 1, 1)
    m.up = m.up.reshape(*m.up.shape, 1, 1)
    if m.dora is not None:
        m.dora.magnitude = m.dora.magnitude.reshape(*m.dora.magnitude.shape, 1, 1)


def _source_format(refs: dict[str, KeyRef], adapter: Adapter, raw: RawSource) -> str | list[str]:
    families = {r.family for r in refs.values()}
    if families == {"diffusers-peft"} and adapter.base_model == "flux" and _made_by_aitoolkit(raw.metadata):
        families = {"flux-aitoolkit"}
    if families & {"lycoris", "onetrainer"}:
        families.discard("kohya")  # their text-encoder keys are spelled like kohya's
    if not families:
        return "unknown" if adapter.unknown else "empty"
    return families.pop() if len(families) == 1 else sorted(families)


def _made_by_aitoolkit(metadata: Mapping[str, str]) -> bool:
    return "ai-toolkit" in metadata.get("software", "") or "ai-toolkit" in metadata.get("ss_training_comment", "")


def _read_parts(raw: RawSource) -> Adapter:
    out = Adapter(source_format="peft")
    for comp, part in raw.parts:
        a = read_raw(part, component=comp)
        for m in a.modules.values():
            out.add(m)
        out.unknown.extend(a.unknown)
        out.unknown_reasons.update(a.unknown_reasons)
        out.metadata.update(a.metadata)
    out.base_model = detect_base_model(out.modules)
    return out

