"""Original <-> diffusers module names as data: per block kind, the single-file block name, the diffusers block
name and the renames of the layers inside a block; the renames of the top-level layers. Flux and SD3 carry such
a table as their entry's ``renames``; a family described by rules gets the same table from its rules (each
group's block templates and linears, :meth:`Renames.from_rules`), so that its names resolve at any depth.

Block names are templates with ``{i}`` (``double_blocks.{i}``, ``txt_in.individual_token_refiner.blocks.{i}``);
a plain name (``double_blocks``) means ``<name>.{i}``. Besides dotted paths, :meth:`Renames.from_underscored`
reads a kohya-style id (every ``.`` written ``_``) exactly: the block templates and layer names say where the
dots were, so no vocabulary guess is needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

Block = tuple[str, str, Mapping[str, str]]  # (original template, diffusers template, {original layer: diffusers})
# (optionally a 4th item: diffusers layer names with no single-file name of their own, the parts of a fused weight)


def _template(name: str) -> str:
    return name if "{i}" in name else f"{name}.{{i}}"


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


def _pattern(template: str, sep: str) -> re.Pattern[str]:
    body = re.escape(template.replace(".", sep)).replace(re.escape("{i}"), r"(\d+)")
    return re.compile(f"^{body}{re.escape(sep)}(.+)$")


class Renames:
    """``blocks``: (single-file block template, diffusers block template, {single-file layer: diffusers layer});
    ``top``: {single-file name: diffusers name} of the layers outside the blocks."""

    @classmethod
    def from_entry(cls, data: Mapping) -> Renames:
        """From an entry's ``{"blocks": {original: {"diffusers": ..., "layers": {...}}}, "top": {...}}``."""
        blocks = [(o, b["diffusers"], b["layers"]) for o, b in data.get("blocks", {}).items()]
        return cls(blocks, data.get("top", {}))

    @classmethod
    def from_rules(cls, groups: Iterable[Mapping], naming: str = "original") -> Renames:
        """The names a family's rules give (``naming``: ``original`` single-file names, or ``kohya`` for the
        names kohya-style ids carry where a group renames them). A fused linear's name maps to the group's
        fused pseudo-module (``img_attn.qkv`` -> ``attn.to_qkv``); its parts have no single-file name."""
        blocks: dict[tuple[str, str], dict[str, str]] = {}
        parts: dict[tuple[str, str], set[str]] = {}
        top: dict[str, str] = {}
        for group in groups:
            kohya = group.get("kohya", {}) if naming == "kohya" else {}
            fused = group.get("fused", {})
            layers: dict[str, str] = {}
            for linear in group["linears"]:
                diffusers, original = linear[0], linear[1]
                rows = linear[3] if len(linear) > 3 else None
                if rows is not None and not isinstance(rows[0], list):  # a part of a fused weight
                    parts.setdefault((group.get("original", ""), group.get("diffusers", "")), set()).add(diffusers)
                    diffusers = fused[original]
                layers[kohya.get(original, original)] = diffusers
            base_d, base_o = group.get("diffusers", ""), group.get("original", "")
            if "{i}" in base_o:
                blocks.setdefault((base_o, base_d), {}).update(layers)
            else:
                top.update({_join(base_o, o): _join(base_d, d) for o, d in layers.items()})
        return cls([(o, d, inner, frozenset(parts.get((o, d), ()))) for (o, d), inner in blocks.items()], top)

    def __init__(self, blocks: Sequence[Block], top: Mapping[str, str]):
        self._blocks = [(_template(b[0]), _template(b[1]), dict(b[2]), frozenset(b[3]) if len(b) > 3 else frozenset())
                        for b in blocks]
        self._top, self._top_inv = dict(top), {v: k for k, v in top.items()}
        self.roots = frozenset({o.split(".", 1)[0] for o, *_ in self._blocks} | {k.split(".", 1)[0] for k in top})

    @cached_property
    def _dotted(self) -> list[tuple[re.Pattern, re.Pattern, str, str, dict[str, str], dict[str, str]]]:
        return [(_pattern(o, "."), _pattern(d, "."), o, d, inner, {v: k for k, v in inner.items()})
                for o, d, inner, _ in self._blocks]

    @staticmethod
    def _rename(path: str, blocks, top: Mapping[str, str], forward: bool) -> str | None:
        for po, pd, o, d, inner, inverse in blocks:
            m = (po if forward else pd).match(path)
            if m is None:
                continue
            name = (inner if forward else inverse).get(m.group(2))
            if name is not None:
                return f"{(d if forward else o).format(i=m.group(1))}.{name}"
        return top.get(path)

    def to_diffusers(self, path: str) -> str | None:
        """A single-file module path in diffusers names (None: the family has no such module)."""
        return self._rename(path, self._dotted, self._top, True)

    def to_original(self, path: str) -> str | None:
        """A diffusers path in single-file names; None when the single file has no weight of that name (the
        parts of a fused q/k/v)."""
        return self._rename(path, self._dotted, self._top_inv, False)

    @cached_property
    def _underscored(self) -> dict[str, list]:
        """Per side (``original``, ``diffusers``): (block id pattern, template, {underscored layer: layer}) and
        {underscored top name: name}."""
        out: dict[str, list] = {}
        for side in ("original", "diffusers"):
            blocks = []
            for o, d, inner, split in self._blocks:
                names = inner if side == "original" else {v: v for v in (*inner.values(), *split)}
                template = o if side == "original" else d
                blocks.append((_pattern(template, "_"), template, {k.replace(".", "_"): k for k in names}))
            top = self._top if side == "original" else self._top_inv
            names = top if side == "original" else {v: v for v in self._top_inv}
            out[side] = [blocks, {k.replace(".", "_"): k for k in names}]
        return out

    def from_underscored(self, module_id: str, side: str) -> str | None:
        """The dotted ``side`` path (``original`` or ``diffusers``) of a kohya-style id written in that side's
        names, when the id is exactly a module of this table (None otherwise)."""
        blocks, top = self._underscored[side]
        for pattern, template, names in blocks:
            m = pattern.match(module_id)
            if m is not None and m.group(2) in names:
                return f"{template.format(i=m.group(1))}.{names[m.group(2)]}"
        return top.get(module_id)

    def knows_diffusers(self, path: str) -> bool:
        """Whether a dotted diffusers path is a module this table names (at any block index)."""
        if path in self._top_inv:
            return True
        for (_, pd, *_), (_, _, inner, split) in zip(self._dotted, self._blocks, strict=True):
            m = pd.match(path)
            if m is not None and (m.group(2) in split or m.group(2) in inner.values()):
                return True
        return False
