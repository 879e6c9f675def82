"""How a family names its modules in every layout style: ``resolve`` (a name as a file writes it -> the canonical
place) and ``spell`` (the reverse), from the family's table indexes and, for what the table does not list, its
naming rules. A mixin of ``registry.Family``, which holds the data these methods read.

Styles: ``kohya`` (an underscored id under a scope token such as ``lora_te1``: kohya, onetrainer, lycoris), ``diffusers``
(a dotted diffusers path under a component name, or bare), ``original`` (a dotted single-file path under
``diffusion_model``), and a layout of one family's own (``xlabs``: the family's ``<layout>_to_diffusers``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, lru_cache

from loratool.arch import naming
from loratool.arch.indexes import DENOISERS, FamilyIndexes
from loratool.errors import LoraToolError

_TE = re.compile(r"lora_te(\d?)$")
_INDEX = re.compile(r"\.\d+(?=\.|$)")


@dataclass(frozen=True)
class Place:
    """Where a module name lands in canonical form. ``swapped``: the name's weight holds its row halves in the
    other order (BFL/SAI final modulation ``[shift, scale]``); ``known``: the family's table lists it (else its
    rules named it); ``original``: the name was a single-file name (``transformer.double_blocks.0.img_attn_qkv``
    of diffusion-pipe's HunyuanVideo files is a single-file name under a diffusers scope)."""

    component: str
    path: str
    swapped: bool = False
    known: bool = True
    original: bool = False  # the name was written in single-file names (whatever its scope)

    @property
    def key(self) -> str:
        return f"{self.component}.{self.path}" if self.component else self.path


@dataclass(frozen=True)
class Spelling:
    """A module as one layout writes it: the scope token, the name, and whether its rows are swapped."""

    scope: str
    name: str
    swapped: bool = False


def pattern_of(key: str) -> str:
    """A module key with its block indices replaced: ``unet.down_blocks.N.attentions.N.proj_in``."""
    return _INDEX.sub(".N", key)



class FamilyNames(FamilyIndexes):
    """Name resolution and spelling of a family (see the module docstring); ``registry.Family`` provides
    ``table``, ``modules``, ``components``, ``naming``, ``denoiser``, ``is_generic`` and the rest, and
    ``indexes.FamilyIndexes`` the table's lookup indexes."""

    # ------------------------------------------------------------------ kohya-style scopes
    def _scope_component(self, scope: str) -> str | None:
        """The component a kohya-style scope token names in this family."""
        if self.table is not None:
            for comp, prefix in self.table.kohya_prefix.items():
                if prefix == scope and (scope != "lora_unet" or comp in DENOISERS):
                    return comp
        m = _TE.match(scope)
        if m:  # diffusers' numbering (OneTrainer): lora_te1 / lora_te2 / lora_te3; bare lora_te without a table
            if not m.group(1) and self.table is not None:
                return None
            comp = "text_encoder" if m.group(1) in ("", "1") else f"text_encoder_{m.group(1)}"
            return comp if self.is_generic or comp in self.components else None
        if scope == "lora_transformer":
            return "transformer" if self.is_generic or "transformer" in self.components else None
        if scope in ("lora_unet", "lycoris"):
            return self.denoiser or ("unet" if self.is_generic else None)
        return None

    # ------------------------------------------------------------------ resolve / spell
    def resolve(self, style: str, scope: str, name: str) -> Place | None:
        """The canonical place of a module name written in ``style`` under ``scope`` (None: not this family's)."""
        if style == "kohya":
            return self._resolve_kohya(scope, name)
        if style == "diffusers":
            return self._resolve_diffusers(scope, name)
        if style == "original":
            return self._resolve_original(scope, name)
        convert = getattr(self.naming, f"{style}_to_diffusers", None)
        path = convert(name) if convert is not None else None
        if path is None or self.denoiser is None:
            return None
        return self._place(self.denoiser, path)

    def known_place(self, style: str, scope: str, name: str) -> Place | None:
        """:meth:`resolve` by the table's indexes alone (None when the table does not list the module): what
        detection tries first, since a family whose table names every module needs no rule."""
        if style == "kohya":
            found = self._kohya_index.get(f"{scope}_{name}")
            return None if found is None else Place(*found[0].split(".", 1), found[1], True)
        if style == "original":
            key = self._original_index.get(name) if scope == self.original_scope(self.denoiser or "") else None
            return None if key is None else Place(*key.split(".", 1), self.modules[key].row_order is not None, True,
                                                  True)
        if style == "diffusers" and (not scope or scope in self.components):
            for comp in (scope,) if scope else self.components:
                path = naming.text_encoder_path(name) if self.is_text_encoder(comp) else name
                if f"{comp}.{path}" in self.modules:
                    return Place(comp, path)
        return None

    def _place(self, component: str, path: str, swapped: bool = False, original: bool = False) -> Place:
        key = f"{component}.{path}"
        return Place(component, path, swapped, key in self.modules, original)

    def _resolve_kohya(self, scope: str, name: str) -> Place | None:
        found = self._kohya_index.get(f"{scope}_{name}")
        if found is not None:
            comp, _, path = found[0].partition(".")
            return Place(comp, path, found[1], True)
        component = self._scope_component(scope)
        if component is None:
            return None
        renamed = self._renamed_id(component, name)
        if renamed is not None:
            return renamed
        path = underscored(name)
        if self.is_text_encoder(component) and component not in DENOISERS:
            return self._place(component, naming.text_encoder_path(path))
        if self.is_generic and scope in ("lora_unet", "lycoris"):
            component = "unet" if path.split(".", 1)[0] in generic_roots("unet") else "transformer"
        return self._denoiser_place(component, path, original_ok=True)

    def _renamed_id(self, component: str, name: str) -> Place | None:
        """A kohya-style id of a denoiser read exactly by the family's rename table at any depth: in the names
        kohya ids carry (``KOHYA``), single-file names, or diffusers names (None: the table has no such id)."""
        renames = getattr(self.naming, "RENAMES", None)
        if renames is None or component not in DENOISERS:
            return None
        kohya = getattr(self.naming, "KOHYA", None)
        for table, side in ((kohya, "original"), (renames, "original"), (renames, "diffusers")):
            path = table.from_underscored(name, side) if table is not None else None
            if path is None:
                continue
            if side == "original":
                path = table.to_diffusers(path)
            if path is not None:
                return self._place(component, path, self._swapped(component, path), original=side == "original")
        return None

    def _swapped(self, component: str, path: str) -> bool:
        spec = self.modules.get(f"{component}.{path}")
        return spec.row_order is not None if spec is not None else path in getattr(self.naming, "SWAPPED", ())

    def _denoiser_place(self, component: str, path: str, original_ok: bool = True) -> Place | None:
        convert = getattr(self.naming, "original_to_diffusers", None)
        if convert is not None and path.split(".", 1)[0] in getattr(self.naming, "ORIGINAL_ROOTS", ()):
            if not original_ok:
                return None
            diffusers = convert(path)
            if diffusers is not None:
                return self._place(component, diffusers, self._swapped(component, diffusers), original=True)
            if not self._is_diffusers_path(component, path):
                return None
        return self._place(component, path)

    def _is_diffusers_path(self, component: str, path: str) -> bool:
        renames = getattr(self.naming, "RENAMES", None)
        return f"{component}.{path}" in self.modules or (renames is not None and renames.knows_diffusers(path))

    def _resolve_diffusers(self, scope: str, name: str) -> Place | None:
        if scope:
            if not self.is_generic and scope not in self.components:
                return None
            if self.is_text_encoder(scope) and scope not in DENOISERS:
                return self._place(scope, naming.text_encoder_path(name))
            if scope in DENOISERS and not self.is_generic and not self._is_diffusers_path(scope, name):
                return self._denoiser_place(scope, name) or self._place(scope, name)
            return self._place(scope, name)
        for comp in self.components:  # a bare path: the component whose table holds it, else whose roots fit
            path = naming.text_encoder_path(name) if self.is_text_encoder(comp) else name
            if f"{comp}.{path}" in self.modules:
                return Place(comp, path)
        if self.denoiser is not None and not self.is_generic:  # single-file names, bare (fal's Kontext files)
            if self._is_diffusers_path(self.denoiser, name):
                return self._place(self.denoiser, name)
            place = self._denoiser_place(self.denoiser, name)
            if place is not None and place.original:
                return place
        root = name.split(".", 1)[0]
        for comp in self.components:
            roots = generic_roots(comp) if self.is_generic else self.roots.get(comp, frozenset())
            path = naming.text_encoder_path(name) if self.is_text_encoder(comp) else name
            if root in roots or path.split(".", 1)[0] in roots:
                return self._place(comp, path)
        return None

    def _resolve_original(self, scope: str, name: str) -> Place | None:
        component = self.denoiser
        if self.is_generic:
            component = "unet" if name.split(".", 1)[0] in generic_original_roots() else "transformer"
            return Place(component, name, False, False)
        if component is None or scope != self.original_scope(component):
            return None
        key = self._original_index.get(name)
        if key is not None:
            spec = self.modules[key]
            return Place(spec.component, spec.path, spec.row_order is not None, True, True)
        return self._denoiser_place(component, name, original_ok=True)

    def spell(self, style: str, component: str, path: str, *, single_te: bool = False) -> Spelling | None:
        """How a layout of ``style`` writes a canonical module (None: the style has no name for it).

        Styles: ``kohya`` (kohya's ids: what ComfyUI reads), ``musubi`` (musubi-tuner's ids: single-file or
        diffusers names as the family's ``musubi_names`` says), ``onetrainer`` (diffusers names under
        kohya-style scopes), ``lycoris`` (the LyCORIS wrapper's ``lycoris_`` ids, denoisers only), ``diffusers``
        and ``original`` (single-file names under ``diffusion_model``, denoisers only). A part of a fused weight
        has no kohya or original name; a fused weight has no diffusers name."""
        key = f"{component}.{path}"
        spec = self.modules.get(key)
        te = self.is_text_encoder(component) and component not in DENOISERS
        if style == "musubi":
            if te or self.musubi_names != "diffusers":
                style = "kohya" if te else "musubi-original"
            elif key in self.fused:
                return None
            else:
                return Spelling(self._kohya_scope(component), naming.path_to_underscore(path))
        if style in ("diffusers", "onetrainer", "lycoris") and key in self.fused:
            return None
        if style == "diffusers":
            return Spelling(component, naming.text_encoder_path(path) if te else path)
        if style in ("onetrainer", "lycoris"):
            if te:
                if style == "lycoris":
                    return None
                return Spelling(self.te_scope(component, onetrainer=True),
                                naming.path_to_underscore(naming.text_encoder_path(path)))
            scope = "lycoris" if style == "lycoris" else (
                "lora_transformer" if component == "transformer" else self._kohya_scope(component))
            return Spelling(scope, naming.path_to_underscore(path))
        if spec is not None and spec.fused_in:
            return None
        if style == "kohya":
            if te:
                scope = self.te_scope(component, single=single_te and self.is_generic)
                return Spelling(scope, naming.path_to_underscore(naming.text_encoder_path(path)))
            scope = self._kohya_scope(component)
            if spec is not None:
                return Spelling(scope, spec.kohya[len(scope) + 1:], self.kohya_names == "original" and
                                spec.row_order is not None)
            if self.kohya_names == "original":
                original = self._to_original(component, path)
                if original is None:
                    return None
                return Spelling(scope, naming.path_to_underscore(original[0]), original[1])
            return Spelling(scope, naming.path_to_underscore(path))
        if style == "original":
            scope = self.original_scope(component)
            if te or scope is None:
                return None
            original = self._to_original(component, path)
            return None if original is None else Spelling(scope, original[0], original[1])
        if style == "musubi-original":
            original = self._to_original(component, path)
            return None if original is None else Spelling(self._kohya_scope(component),
                                                          naming.path_to_underscore(original[0]), original[1])
        raise LoraToolError(f"unknown naming style {style!r}")

    def _kohya_scope(self, component: str) -> str:
        t = self.table
        return t.kohya_prefix.get(component, "lora_unet") if t is not None else "lora_unet"

    def _to_original(self, component: str, path: str) -> tuple[str, bool] | None:
        spec = self.modules.get(f"{component}.{path}")
        if spec is not None:
            name = self._original_name(spec)
            return None if name is None else (name, spec.row_order is not None)
        convert = getattr(self.naming, "diffusers_to_original", None)
        if convert is None:
            return None
        name = convert(path)
        return None if name is None else (name, path in getattr(self.naming, "SWAPPED", ()))


# ---------------------------------------------------------------------- shared by every family

@cache
def vocabulary() -> frozenset[str]:
    """Every name with an ``_`` in it that some family with a generated table uses (parameters and single-file
    keys), plus the generic entry's words: what kohya's underscored ids need to be read back. (A family described
    by rules reads its ids exactly by its rename table; its words would mislead others: HunyuanVideo's
    ``img_attn_qkv`` is one name where Flux's ``img_attn_qkv`` is two.)"""
    from loratool.arch.registry import families, family

    words: set[str] = set(family("generic").entry.get("words", ()))
    for fam in families():
        t = fam.table
        if t is None or not fam.entry.get("table"):  # a family of rules reads its ids by its rename table
            continue
        for (component, name), p in t.params.items():
            if component not in t.components:  # the VAE: never adapted
                continue
            words.update(w for w in name.split(".") if "_" in w)
            if p.checkpoint_key:
                words.update(w for w in p.checkpoint_key.split(".") if "_" in w)
    return frozenset(words)


@lru_cache(maxsize=1 << 16)
def underscored(name: str) -> str:
    """A kohya id's name part as a dotted path (every family reads one name the same way: asked once)."""
    return naming.underscore_to_path(name, vocabulary())


@cache
def generic_roots(component: str) -> frozenset[str]:
    """The first names of a component's module paths in any family (how a bare path finds its component)."""
    from loratool.arch.registry import families

    out: set[str] = set()
    for fam in families():
        out |= fam.roots.get(component, frozenset())
    return frozenset(out)


@cache
def generic_original_roots() -> frozenset[str]:
    """First names of single-file UNet paths in any family (a ``diffusion_model.`` file without a family)."""
    from loratool.arch.registry import families

    out: set[str] = set()
    for fam in families():
        if fam.denoiser == "unet" and fam.naming is not None:
            out |= getattr(fam.naming, "ORIGINAL_ROOTS", frozenset())
    return frozenset(out)
