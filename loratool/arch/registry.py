"""The family registry: one entry per model family, as data, and the names its modules have in every layout.

An entry is ``data/<family>.json`` (see docs/ARCHITECTURE.md, "Adding a family"): aliases, what metadata
says it (``ss_base_model_version``, ``modelspec.architecture``, ``base_model_name_or_path`` prefixes), its
components and what model each is (``clip`` with or without projection, ``t5``, ``unet``, ``transformer``),
the layouts that apply to it, default components and targets, whether kohya ids use original or diffusers
names, and its module table: a generated table (``data/tables/<family>.json``: every module with its shape,
single-file key, kohya id, LBW block, fused groups) or rules (``rules.py``: blocks x count, linear names,
original <-> diffusers renames, fused row offsets as multiples of the hidden size). Where an original <->
diffusers mapping is algorithmic, ``naming`` names a module of ``loratool.arch.families`` with
``original_to_diffusers``/``diffusers_to_original`` (and, for a layout of its own, ``<layout>_to_diffusers``);
where the mapping is a plain rename table, the entry's ``renames`` is that table (``renames.py``).

Codecs never spell a module themselves. They split a key into a *style* (``kohya``: an underscored id;
``diffusers``: a dotted diffusers path; ``original``: a dotted single-file path; or a layout of one family such
as ``xlabs``), a *scope* (the component token as written: ``lora_te1``, ``unet``, ``diffusion_model``, or ``""``
for none) and a *name*; :meth:`Family.resolve` gives the canonical place, :meth:`Family.spell` the reverse
(``names.py``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from functools import cache, cached_property
from importlib import resources
from types import SimpleNamespace

from loratool.arch import naming
from loratool.arch.names import (  # noqa: F401 - re-exported: the registry is where callers look
    DENOISERS,
    FamilyNames,
    Place,
    Spelling,
    generic_original_roots,
    generic_roots,
    pattern_of,
    underscored,
    vocabulary,
)
from loratool.arch.renames import Renames
from loratool.arch.table import Arch, ModuleSpec
from loratool.errors import LoraToolError


class Family(FamilyNames):
    """One model family: its entry, its table, and its naming in every layout."""

    def __init__(self, entry: dict, table: dict | None = None, variant: str | None = None, *, stored: bool = False):
        self.entry = entry
        self.stored = stored  # the registry's own instance (the package's entry): its table may be kept on disk
        self.name: str = entry["name"]
        self.label: str = entry.get("label", self.name)
        self.aliases: tuple[str, ...] = tuple(entry.get("aliases", ()))
        self.hub: str | None = entry.get("hub")
        self.layouts: tuple[str, ...] = tuple(entry.get("layouts", ()))
        self.default_components: tuple[str, ...] = tuple(entry.get("default_components", ()))
        self.default_targets: str = entry.get("default_targets", "attn")
        self.metadata: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in entry.get("metadata", {}).items()}
        self.kohya_names: str = entry.get("kohya_names", "diffusers")
        self.musubi_names: str = entry.get("musubi_names", self.kohya_names)
        self.variant_of: str | None = entry.get("variant_of")  # a family told apart by metadata alone (Kontext)
        self.variant = variant  # the size variant this instance was built at (``14B``), None: the defaults
        self._components: dict[str, dict] = entry.get("components", {})
        self._table_data = table
        self._sized: dict[tuple, Family] = {}

    def __repr__(self) -> str:
        return f"Family({self.name!r})" if self.variant is None else f"Family({self.name!r}, {self.variant!r})"

    # ------------------------------------------------------------------ data
    @property
    def rules(self) -> dict | None:
        return self.entry.get("rules")

    @cached_property
    def table(self) -> Arch | None:
        if self._table_data is not None:
            return Arch(self._table_data)
        return self._built["table"] if self.stored and self.variant is None else self._build_table(None)

    @cached_property
    def _built(self) -> dict:
        """The table at the defaults with its name indexes: stored by an earlier run (``cache.py``), else built
        now and stored. A sized instance (``at``) gets its table set and builds its indexes itself."""
        from loratool.arch import cache

        found = cache.load(self.name)
        if found is None:  # the table first, in place: the index builders read self.table
            self.__dict__["table"] = self._build_table(None)
            found = {"table": self.table, "kohya_index": self._index_kohya(), "original_index": self._index_original()}
            cache.store(self.name, found)
        return found

    def _build_table(self, sizes: dict[str, int] | None) -> Arch | None:
        from loratool.arch.rules import build_table, merge_tables

        data = read_json(f"tables/{self.entry['table']}.json") if self.entry.get("table") else None
        at_defaults = not sizes or (self.rules is not None and dict(sizes) == dict(self.rules.get("sizes", {})))
        if self.rules and (data is None or not at_defaults):  # a generated table is the defaults' own
            ruled = build_table(self.name, self.rules, sizes)
            data = merge_tables(data, ruled) if data is not None else ruled
        return Arch(data) if data is not None else None

    def sized(self, dims: Mapping[str, tuple[int, ...] | None]) -> Family:
        """This family at the sizes a file's modules show (canonical key -> weight dims), for a family described
        by rules (Wan 1.3B or 14B, SD3.5 Medium or Large): the variant they fit, else the sizes they show. A
        family with an enumerated table is itself."""
        if not self.rules:
            return self
        from loratool.arch.rules import fit_sizes

        variant, sizes = fit_sizes(self.rules, dims)
        return self.at(sizes, variant)

    def at(self, sizes: Mapping[str, int], variant: str | None = None) -> Family:
        """This family built at ``sizes`` (cached per sizes)."""
        key = tuple(sorted(sizes.items()))
        found = self._sized.get(key)
        if found is None:
            found = Family(self.entry, None, variant)
            found.table = self._build_table(dict(sizes))
            found.sizes = dict(sizes)
            self._sized[key] = found
        return found

    @cached_property
    def variant_label(self) -> str | None:
        """The size variant this instance is (its own label, or the variant whose sizes the defaults are)."""
        if self.variant is not None or not self.rules:
            return self.variant
        for name, sizes in self.rules.get("variants", {}).items():
            if all(self.sizes.get(k) == v for k, v in sizes.items()):
                return name
        return None

    @cached_property
    def sizes(self) -> dict[str, int]:
        """The sizes this instance's table is built at (the defaults for the registry's own)."""
        return dict(self.rules.get("sizes", {})) if self.rules else {}

    def variant_sizes(self, label: str) -> dict[str, int] | None:
        """The sizes of a named variant (``14B``; ``large`` for SD3's ``3.5-large``), or None."""
        variants = self.rules.get("variants", {}) if self.rules else {}
        want = label.lower()
        found = [n for n in variants if n.lower() == want] or [n for n in variants if n.lower().endswith("-" + want)]
        return {**self.rules.get("sizes", {}), **variants[found[0]]} if len(found) == 1 else None

    @cached_property
    def naming(self) -> SimpleNamespace | None:
        """The family's name mappings: its ``renames`` (data: the entry's, or its rules'), its ``naming`` module of
        ``loratool.arch.families`` (functions), as ``original_to_diffusers``, ``diffusers_to_original``,
        ``ORIGINAL_ROOTS``, ``SWAPPED``, ``RENAMES`` (the table itself), ``KOHYA`` (the names kohya-style ids
        carry where they are neither) and ``<layout>_to_diffusers``; None when it has none of these."""
        found: dict[str, object] = {}
        renames = self.entry.get("renames")
        table = None
        if renames:
            table = Renames.from_entry(renames)
            found["SWAPPED"] = frozenset(renames.get("swapped", ()))
        elif self.rules:
            groups = [g for spec in self.rules["components"].values() for g in spec["groups"]
                      if spec.get("kohya_prefix") == "lora_unet"]
            table = Renames.from_rules(groups)
            found["SWAPPED"] = frozenset(
                f"{g['diffusers']}.{lin[0]}" if g.get("diffusers") else lin[0] for g in groups
                if "{i}" not in g.get("diffusers", "") for lin in g["linears"]
                if len(lin) > 3 and isinstance(lin[3][0], list))
            if any(g.get("kohya") for g in groups):
                found["KOHYA"] = Renames.from_rules(groups, naming="kohya")
        if table is not None:
            found.update(original_to_diffusers=table.to_diffusers, diffusers_to_original=table.to_original,
                         ORIGINAL_ROOTS=table.roots, RENAMES=table)
        name = self.entry.get("naming")
        if name:
            module = importlib.import_module(f"loratool.arch.families.{name}")
            found.update({k: v for k, v in vars(module).items() if not k.startswith("_")
                          and (callable(v) or k.isupper()) and not isinstance(v, type)})
        return SimpleNamespace(**found) if found else None

    @property
    def is_generic(self) -> bool:
        return self.table is None

    @property
    def components(self) -> tuple[str, ...]:
        return self.table.components if self.table is not None else tuple(self._components)

    def model_of(self, component: str) -> str:
        """What a component is: ``unet``, ``transformer``, ``clip``, ``t5`` or ``model``."""
        return self._components.get(component, {}).get("model", "model")

    def with_projection(self, component: str) -> bool:
        """Whether a CLIP component is a CLIPTextModelWithProjection (its peft names keep ``text_model.``)."""
        return bool(self._components.get(component, {}).get("projection"))

    def is_text_encoder(self, component: str) -> bool:
        return self.model_of(component) in ("clip", "t5") or component.startswith("text_encoder")

    @cached_property
    def denoiser(self) -> str | None:
        found = [c for c in self.components if c in DENOISERS]
        return found[0] if len(found) == 1 else None

    @property
    def modules(self) -> dict[str, ModuleSpec]:
        return self.table.modules if self.table is not None else {}

    @property
    def fused(self) -> dict[str, list[tuple[str, tuple[int, int]]]]:
        """Fused weight -> its parts with their rows (Flux/SD3 q/k/v, Flux single-block linear1)."""
        return self.table.fused if self.table is not None else {}

    def shape(self, key: str) -> tuple[int, ...] | None:
        spec = self.modules.get(key)
        return tuple(spec.shape) if spec is not None else None

    def block(self, key: str) -> str | None:
        """The LBW block of a module (None: not in the table, or no block)."""
        spec = self.modules.get(key)
        return spec.block if spec is not None else None

    @cached_property
    def patterns(self) -> frozenset[str]:
        return frozenset(pattern_of(k) for k in self.modules)

    @cached_property
    def roots(self) -> dict[str, frozenset[str]]:
        """component -> the first names of its module paths (diffusers naming), from the table."""
        out: dict[str, set[str]] = {}
        for spec in self.modules.values():
            out.setdefault(spec.component, set()).add(spec.path.split(".", 1)[0])
        return {c: frozenset(v) for c, v in out.items()}

    @cached_property
    def block_order(self) -> dict[str, int]:
        """Block label -> its position in model order: the first LBW slot its modules fall in."""
        slots = {slot: i for i, slot in enumerate(self.table.lbw.get("slots", ()))} if self.table else {}
        order: dict[str, int] = {}
        for spec in self.modules.values():
            if spec.block in slots:
                label = naming.block_label(spec.component, spec.path)
                order[label] = min(order.get(label, slots[spec.block]), slots[spec.block])
        return order

    def block_sort_key(self, label: str) -> tuple:
        """Blocks in model order (components in the family's order; LBW slot order within one), then the
        blocks no table knows by name and index."""
        component, _, head = label.partition(":")
        name, _, index = head.partition(".")
        comps = self.components or tuple(c for c in self._components)
        comp = comps.index(component) if component in comps else len(comps)
        return (comp, component, self.block_order.get(label, len(self.block_order)), name,
                int(index) if index.isdigit() else -1)


# ---------------------------------------------------------------------- loading

def read_json(relative: str) -> dict:
    try:
        text = resources.files("loratool.arch").joinpath("data", relative).read_text()
    except FileNotFoundError as exc:
        raise LoraToolError(f"architecture data {relative} is missing from the package") from exc
    return json.loads(text)


@cache
def family_names() -> tuple[str, ...]:
    """Every family with an entry, in detection priority order (the generic notion last)."""
    names = sorted(p.name.removesuffix(".json") for p in resources.files("loratool.arch").joinpath("data").iterdir()
                   if p.name.endswith(".json"))
    order = {"sd1": 0, "sd2": 1, "sdxl": 2, "flux": 3, "sd3": 4}
    names.sort(key=lambda n: (n == "generic", order.get(n, len(order)), n))
    return tuple(names)


@cache
def _entry(name: str) -> Family:
    return Family(entry_data(name), stored=True)


def entry_data(name: str) -> dict:
    """An entry's data; ``same_as`` names an entry whose fields it takes where it has none (Flux Kontext is
    Flux's table and names with its own name, label and metadata)."""
    data = read_json(f"{name}.json")
    base = data.get("same_as")
    return {**entry_data(base), **data} if base else data


@cache
def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in family_names():
        out[name] = name
        for alias in _entry(name).aliases:
            out.setdefault(alias.lower(), name)
    return out


def canonical_family(name: str) -> str | None:
    """A family's name from any of its spellings (None when unknown)."""
    return _aliases().get(name.lower().strip()) if isinstance(name, str) else None


def model(name: str) -> Family:
    """A family, or one of its size variants by ``<family>-<variant>`` (``wan-14b``, ``wan2.1-1.3b``,
    ``sd3.5-large``: an alias may name a variant's prefix, ``variant_prefixes``): the family built at that
    variant's sizes (``LoraToolError`` when unknown)."""
    if canonical_family(name) is not None:
        return family(name)
    head, _, label = name.strip().rpartition("-")
    while head:
        found = canonical_family(head)
        prefix = family(found).entry.get("variant_prefixes", {}).get(head.lower()) if found else None
        sizes = (prefix and family(found).variant_sizes(f"{prefix}-{label}")) or (
            family(found).variant_sizes(label) if found else None)
        if sizes is not None:
            fam = family(found)
            return fam.at(sizes, next(v for v in fam.rules["variants"] if fam.variant_sizes(v) == sizes))
        head, _, more = head.rpartition("-")
        label = f"{more}-{label}"
    raise LoraToolError(f"unknown model {name!r}: use one of {', '.join(model_names())}")


@cache
def model_names() -> tuple[str, ...]:
    """Every family name and ``<family>-<variant>`` of the families described by rules (for ``--model``)."""
    out = []
    for fam in families():
        out.append(fam.name)
        out += [f"{fam.name}-{v.lower()}" for v in (fam.rules or {}).get("variants", {})]
    return tuple(out)


def family(name: str) -> Family:
    """The family of a name or alias (``LoraToolError`` when unknown)."""
    key = canonical_family(name)
    if key is None:
        raise LoraToolError(f"unknown model family {name!r}: use one of {', '.join(family_names())}")
    return _entry(key)


def family_for(adapter) -> Family:
    """The family an adapter's names are spelt in, at the sizes its modules show (a family described by rules:
    Wan 14B, a tiny test model); the generic notion when its base model is unknown. ``adapter`` is any object
    with ``base_model``, ``modules`` (canonical key -> module with ``weight_shape``) and ``detection``."""
    name = canonical_family(adapter.base_model) or "generic"
    fam = family(name)
    if not fam.rules:
        return fam
    found = getattr(adapter, "detection", None)
    if found is not None and found.family == name and found.sizes:
        return fam.at(dict(found.sizes), found.variant)
    return fam.sized({key: tuple(m.weight_shape) for key, m in adapter.modules.items()})


@cache
def retargets() -> dict[str, tuple[str, dict]]:
    """Every retargeting an entry offers (``retarget``): name -> (the family it applies to, what it says: the
    target ``family``, ``sizes`` and ``why`` a dropped module has no place there). Wan's ``wan-t2v`` drops the
    image-to-video modules; Flux's ``chroma`` drops what Chroma does not have. Only the entry that says it offers
    it: an entry that takes another's fields (``same_as``: Kontext) does not take over its retargetings."""
    return {name: (fam.name, spec) for fam in families()
            for name, spec in (fam.entry.get("retarget") or {}).items()
            if not fam.entry.get("same_as") or name not in (entry_data(fam.entry["same_as"]).get("retarget") or {})}


def families(include_generic: bool = False) -> list[Family]:
    return [_entry(n) for n in family_names() if include_generic or n != "generic"]


def naming_function(name: str):
    """The first family naming module's function of this name (a fact only one family has, such as
    cloneofsimo's SD1 layer order), or None."""
    for fam in families():
        function = getattr(fam.naming, name, None)
        if function is not None:
            return function
    return None
