"""A family's lookup indexes, built from its table: kohya-style ids and single-file names -> canonical keys.

A mixin of ``registry.Family`` (through ``names.FamilyNames``, which resolves and spells names with them). The
registry's own instances get them with their table from the on-disk cache (``registry.Family._built``,
``cache.py``); any other instance builds them from its table when first asked.
"""

from __future__ import annotations

from functools import cached_property

from loratool.arch import naming
from loratool.arch.table import ModuleSpec

DENOISERS = ("unet", "transformer")


class FamilyIndexes:
    """``te_scope``, ``from_kohya``, ``original_scope`` and the indexes behind them."""

    def te_scope(self, component: str, *, onetrainer: bool = False, single: bool = False) -> str:
        """The kohya scope of a text encoder: the table's, or diffusers' numbering (``lora_te`` for a lone
        CLIP of a family without a table when ``single``)."""
        if not onetrainer and self.table is not None and component in self.table.kohya_prefix:
            return self.table.kohya_prefix[component]
        index = component.removeprefix("text_encoder").lstrip("_") or "1"
        return "lora_te" if single and index == "1" and not onetrainer else f"lora_te{index}"

    @cached_property
    def _kohya_index(self) -> dict[str, tuple[str, bool]]:
        """kohya-style id -> (canonical key, rows swapped)."""
        return self._indexes("kohya_index", self._index_kohya)

    @cached_property
    def _original_index(self) -> dict[str, str]:
        """single-file name (denoisers, without prefix and .weight) -> canonical key."""
        return self._indexes("original_index", self._index_original)

    def _indexes(self, name: str, build):
        self.table  # noqa: B018 - the registry's own instance: the table comes with its indexes (registry._built)
        built = self.__dict__.get("_built")
        return built[name] if built is not None else build()

    def _index_kohya(self) -> dict[str, tuple[str, bool]]:
        """:attr:`_kohya_index` from the table. Primary ids first: aliases never shadow them."""
        index: dict[str, tuple[str, bool]] = {}
        t = self.table
        if t is None:
            return index
        original = self.kohya_names == "original"
        for spec in t.modules.values():
            if not spec.fused_in:
                index[spec.kohya] = (spec.key, original and spec.row_order is not None)
        for spec in t.modules.values():
            under = naming.path_to_underscore(spec.path)
            if spec.component in DENOISERS:
                prefix = t.kohya_prefix[spec.component]
                aliases = [f"{prefix}_{under}", f"lycoris_{under}"]
                if spec.component == "transformer":
                    aliases.append(f"lora_transformer_{under}")
                for alias in aliases:
                    index.setdefault(alias, (spec.key, False))
                ckey = self._original_name(spec)
                if ckey is not None:
                    index.setdefault(f"{prefix}_{naming.path_to_underscore(ckey)}", (spec.key, spec.row_order is not None))
                continue
            bare = naming.path_to_underscore(naming.without_clip_wrapper(spec.path))
            for scope in dict.fromkeys((t.kohya_prefix[spec.component], self.te_scope(spec.component, onetrainer=True))):
                index.setdefault(f"{scope}_{under}", (spec.key, False))
                index.setdefault(f"{scope}_{bare}", (spec.key, False))
        return index

    def from_kohya(self, module_id: str) -> str | None:
        """The canonical key of a kohya-style id this family's table knows (None otherwise)."""
        found = self._kohya_index.get(module_id)
        return found[0] if found else None

    # ------------------------------------------------------------------ original (single-file) names
    def _original_prefix(self, component: str) -> str | None:
        t = self.table
        return t.checkpoint_prefix.get(component) if t is not None else None

    def original_scope(self, component: str) -> str | None:
        """The scope a LoRA in single-file names uses: ``diffusion_model`` (the checkpoint's prefix without
        ``model.``); denoisers only."""
        prefix = self._original_prefix(component)
        if component not in DENOISERS or not prefix:
            return "diffusion_model" if component in DENOISERS and self.naming is not None else None
        return prefix.removeprefix("model.").rstrip(".")

    def _original_name(self, spec: ModuleSpec) -> str | None:
        """A whole module's single-file name without prefix and .weight (None for a part of a fused weight)."""
        prefix = self._original_prefix(spec.component)
        if not spec.checkpoint_key or spec.checkpoint_rows is not None or spec.fused_in or prefix is None:
            return None
        return spec.checkpoint_key[len(prefix):].removesuffix(".weight")

    def _index_original(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for spec in self.modules.values():
            if spec.component in DENOISERS:
                name = self._original_name(spec)
                if name is not None:
                    out.setdefault(name, spec.key)
        return out
