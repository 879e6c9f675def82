"""``convert``: decide what every module of an adapter becomes in another file layout.

Pure: a canonical :class:`~loratool.core.modules.Adapter` in, the adapter the target codec will
write (and a report of what was done) out. Nothing is read or written here.

Per module, in order of preference:

* **rename** — the target holds the module as it is; its tensors are the very same objects, so
  the written bytes are bit-identical;
* **exact rewrite** — rsLoRA written as a plain alpha (``alpha·√r``), the scale folded as
  ``√scale`` into both factors where the target has no alpha, a Tucker core folded into ``down``,
  fused projections (Flux, SD3 q/k/v) split or joined (the same ΔW, up to float rounding);
* **lossy** — only when asked (``rank`` or ``lossy``): LoHa, LoKr, full diffs (and anything else
  the target cannot hold) as plain LoRA from a truncated SVD of ΔW, with the relative error;
* **refused** — a module the target cannot express stops the conversion with its name and the
  reason, unless ``drop_unknown`` (then it is listed as dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loratool.arch import canonical_family, family, family_names
from loratool.core.modules import Adapter, LoraModule, Module
from loratool.errors import LoraToolError
from loratool.formats.diffusers import is_attention_projection
from loratool.formats.layouts import find_layout
from loratool.ops.convert_fused import regroup_fused
from loratool.ops.convert_math import (
    DEFAULT_ENERGY,
    DEFAULT_RANK_CAP,
    fold_scale,
    fold_tucker,
    lower_to_lora,
    unfold_rslora,
)
from loratool.ops.convert_targets import TargetSpec, resolve_target

LYCORIS_KINDS = ("loha", "lokr", "full")


class Unexpressible(Exception):
    """A module the target layout cannot hold (its message says why)."""


@dataclass
class ModuleChange:
    """What happened to one source module."""

    key: str
    kind: str
    action: str  # rename, unfold-rslora, fold-alpha, fold-tucker, svd, fuse, split, drop
    targets: list[str] = field(default_factory=list)
    rank_in: int | None = None
    rank_out: int | None = None
    rel_error: float | None = None  # measured, for lossy changes
    note: str = ""

    def to_json(self) -> dict:
        out = {"key": self.key, "kind": self.kind, "action": self.action, "targets": self.targets,
               "rank_in": self.rank_in, "rank_out": self.rank_out}
        if self.rel_error is not None:
            out["rel_error"] = self.rel_error
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class ConvertReport:
    source_format: str
    target: str
    changes: list[ModuleChange] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    embeddings: list[str] = field(default_factory=list)
    retargeted: list[tuple[str, str]] = field(default_factory=list)  # (key, why): left out for --retarget
    notes: list[str] = field(default_factory=list)

    @property
    def lossy(self) -> list[ModuleChange]:
        return [c for c in self.changes if c.action == "svd"]

    @property
    def max_rel_error(self) -> float:
        return max((c.rel_error or 0.0 for c in self.lossy), default=0.0)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.changes:
            out[c.action] = out.get(c.action, 0) + 1
        if self.dropped:
            out["drop"] = len(self.dropped)
        return out

    @property
    def exact(self) -> bool:
        return not self.lossy and not self.dropped

    def to_json(self) -> dict:
        return {
            "source_format": self.source_format, "target": self.target, "exact": self.exact,
            "counts": self.counts(), "max_rel_error": self.max_rel_error,
            "modules": [c.to_json() for c in self.changes],
            "dropped": [{"key": k, "why": w} for k, w in self.dropped],
            "retargeted": [{"key": k, "why": w} for k, w in self.retargeted],
            "notes": self.notes,
            "embeddings": self.embeddings,
        }


@dataclass(frozen=True)
class ConvertOptions:
    rank: int | None = None  # lossy lowering at this rank
    lossy: bool = False  # lowering allowed (implied by rank)
    energy: float = DEFAULT_ENERGY
    rank_cap: int = DEFAULT_RANK_CAP
    drop_unknown: bool = False
    dtype: torch.dtype | None = None

    @property
    def lowering(self) -> bool:
        return self.lossy or self.rank is not None


def convert(adapter: Adapter, to: str, *, rank: int | None = None, lossy: bool = False,
            energy: float = DEFAULT_ENERGY, rank_cap: int = DEFAULT_RANK_CAP, drop_unknown: bool = False,
            dtype: torch.dtype | None = None, retarget: str | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> tuple[Adapter, ConvertReport]:
    """The adapter as ``to`` will hold it, and what was done to each module (``progress(done, total, key)``
    after each).

    Raises :class:`LoraToolError` naming every module (or unknown key) the target cannot hold,
    unless ``drop_unknown``. ``retarget`` (``arch.retargets()``: ``wan-t2v``, ``chroma``) first leaves out the
    modules the sibling model lacks, each listed in ``report.retargeted``. Metadata is left to
    :func:`loratool.ops.convert_meta.target_metadata`.
    """
    if rank is not None and rank < 1:
        raise LoraToolError(f"--rank must be at least 1 (got {rank})")
    spec = resolve_target(to)
    left_out: list[tuple[str, str]] = []
    if retarget is not None:
        from loratool.ops.retarget import retarget as retarget_adapter

        adapter, left_out = retarget_adapter(adapter, retarget)
    fam = family(canonical_family(adapter.base_model) or "generic")
    if spec.name not in fam.layouts:
        raise LoraToolError(f"the {spec.name} layout has no place for a {fam.name} adapter "
                            f"(it takes {', '.join(fam.layouts)})")
    opts = ConvertOptions(rank, lossy, energy, rank_cap, drop_unknown, dtype)
    report = ConvertReport(adapter.source_format or "unknown", spec.name, retargeted=left_out)
    if fam.is_generic:
        report.notes.append(_names_kept(adapter, spec))
    problems: list[tuple[str, str]] = [(k, adapter.unknown_reasons.get(k, "no format recognises this key"))
                                       for k in adapter.unknown]
    result = Adapter(metadata=dict(adapter.metadata), base_model=adapter.base_model, source_format=spec.name,
                     embeddings=dict(adapter.embeddings), detection=adapter.detection)
    report.embeddings = sorted(adapter.embeddings)
    for done, (key, module) in enumerate(adapter.modules.items(), 1):
        try:
            new, change = convert_module(module, spec, opts)
            report.changes.append(change)
            result.add(new)
        except Unexpressible as e:
            problems.append((key, str(e)))
        if progress:
            progress(done, len(adapter.modules), key)
    problems += _partial_dora(result, spec)
    if problems and not drop_unknown:
        raise LoraToolError(_refusal(problems, spec))
    report.dropped = problems
    for key, _ in problems:
        result.modules.pop(key, None)
    result = regroup_fused(result, spec, report)
    if dtype is not None:
        result = cast_adapter(result, dtype)
    return result, report


# layouts that spell a module of an unknown family alike (kohya-style ids are family-specific: a scope token
# and which names the ids carry; dotted diffusers paths are the model's own module names)
_SAME_NAMES = ({"diffusers", "peft", "aitoolkit", "diffusers-old"},)


def _names_kept(adapter: Adapter, spec: TargetSpec) -> str:
    """For a family no entry knows: the target must spell names as the source did, so that they are kept as
    they are; anything else would be a guess that looks valid (a Wan file's ``lora_unet_blocks_0_self_attn_q``
    is no ``transformer.blocks.0.self_attn.q`` any loader reads). Refused otherwise."""
    sources = adapter.source_format if isinstance(adapter.source_format, list) else [adapter.source_format]
    sources = [s for s in sources if find_layout(s or "") is not None]  # read from a file (not built in memory)
    group = next((g for g in _SAME_NAMES if spec.name in g), {spec.name})
    if not all(s in group for s in sources):
        raise LoraToolError(f"the model family of this {'/'.join(sources)} adapter is unknown, so its module "
                            f"names cannot be spelt as {spec.name} names without guessing; --arch names the family "
                            f"(one of {', '.join(family_names())}), or --to {sources[0]} keeps the names as they are")
    return "the model family is unknown: module names are kept as the file has them"


def _refusal(problems: list[tuple[str, str]], spec: TargetSpec) -> str:
    """One line: each distinct reason once, with the first few modules it stops."""
    by_reason: dict[str, list[str]] = {}
    for key, why in problems:
        by_reason.setdefault(why, []).append(key)
    parts = []
    for why, keys in by_reason.items():
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        parts.append(f"{shown}: {why}")
    return (f"{len(problems)} module(s) cannot be written as {spec.name}: {'; '.join(parts)}. "
            "Nothing was written; --drop-unknown converts the rest and lists what was dropped")


def convert_module(module: Module, spec: TargetSpec, opts: ConvertOptions) -> tuple[Module, ModuleChange]:
    """One module as the target holds it (raises :class:`Unexpressible`)."""
    if not spec.holds_component(module.component):
        raise Unexpressible(f"{spec.name} has no place for a {module.component!r} component")
    if spec.attention_only and not is_attention_projection(module):
        raise Unexpressible(f"{spec.name} holds attention projections only (to_q, to_k, to_v, to_out)")
    if module.bias is not None and not spec.bias:
        raise Unexpressible(f"a bias change; {spec.name} stores only weight factors")
    rank_in = module.rank if isinstance(module.rank, int) else None
    change = ModuleChange(module.key, module.kind, "rename", [module.key], rank_in, rank_in)
    if module.kind == "norm":
        if "norm" not in spec.kinds:
            raise Unexpressible(f"a LyCORIS norm-layer change; {spec.name} holds only LoRA factors")
        return module, change
    if module.kind in LYCORIS_KINDS and (opts.lowering or module.kind not in spec.kinds):
        if not opts.lowering:
            raise Unexpressible(f"a {module.kind} module; {spec.name} holds only plain LoRA: --rank N or "
                                "--lossy turns it into LoRA by a truncated SVD of ΔW (lossy, measured)")
        module, err = lower_to_lora(module, opts.rank, energy=opts.energy, cap=opts.rank_cap)
        change.action, change.rel_error, change.rank_out = "svd", err, module.rank
    if isinstance(module, LoraModule):
        module = _lora_for(module, spec, change)
    _check_dora(module, spec)
    return module, change


def _lora_for(module: LoraModule, spec: TargetSpec, change: ModuleChange) -> LoraModule:
    """The exact rewrites a plain LoRA/LoCon needs for this target, recorded on ``change``."""
    def did(action: str) -> None:
        if change.action == "rename":
            change.action = action
        elif action not in change.action:
            change.action = f"{change.action}+{action}"

    if module.mid is not None and not spec.tucker:
        module = fold_tucker(module)
        did("fold-tucker")
    if module.rslora and not spec.rslora:
        module = unfold_rslora(module)
        did("unfold-rslora")
    if not spec.alpha and module.alpha is not None:
        if module.scale != 1.0:
            did("fold-alpha")
        module = fold_scale(module)
    change.rank_out = module.rank
    return module


def _check_dora(module: Module, spec: TargetSpec) -> None:
    if module.dora is None:
        return
    if not spec.dora_axes:
        raise Unexpressible(f"a DoRA module; {spec.name} has no place for a DoRA magnitude")
    if module.dora.axis not in spec.dora_axes:
        have = "per input column (older LyCORIS/A1111)" if module.dora.axis == "in" else "per output row"
        raise Unexpressible(f"a DoRA magnitude taken {have}; {spec.name} stores only "
                            f"{'/'.join(sorted(spec.dora_axes))}-axis magnitudes, and one cannot be turned "
                            "into the other without the base weight")


def _partial_dora(adapter: Adapter, spec: TargetSpec) -> list[tuple[str, str]]:
    """peft's ``use_dora`` is one switch per model: DoRA on some modules of a component only cannot be
    written for a peft-style target (every module would get a magnitude it does not have)."""
    if spec.name not in ("diffusers", "peft"):
        return []
    out = []
    for comp in adapter.components():
        mods = [m for m in adapter.modules.values() if m.component == comp]
        with_dora = [m for m in mods if m.dora is not None]
        if with_dora and len(with_dora) < len(mods):
            why = (f"DoRA on {len(with_dora)} of the {len(mods)} {comp} modules; {spec.name} switches DoRA on "
                   "for a whole model (use_dora)")
            out += [(m.key, why) for m in mods if m.dora is None]
    return out


def cast_adapter(adapter: Adapter, dtype: torch.dtype) -> Adapter:
    """Every stored tensor of every module cast to ``dtype`` (alphas are plain floats)."""
    out = Adapter(metadata=adapter.metadata, base_model=adapter.base_model, source_format=adapter.source_format,
                  embeddings={k: v.to(dtype) for k, v in adapter.embeddings.items()}, unknown=list(adapter.unknown),
                  detection=adapter.detection)
    for module in adapter.modules.values():
        out.add(_cast_module(module, dtype))
    return out


def _cast_module(module: Module, dtype: torch.dtype) -> Module:
    from dataclasses import fields, replace

    changes = {}
    for f in fields(module):
        value = getattr(module, f.name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            changes[f.name] = value.to(dtype)
    if module.dora is not None:
        changes["dora"] = replace(module.dora, magnitude=module.dora.magnitude.to(dtype))
    return replace(module, **changes)
