"""Original <-> diffusers module names as data (an entry's ``renames``): per block kind, the single-file block
name, the diffusers block name and the renames of the layers inside a block; the renames of the top-level
layers; the diffusers paths whose single-file rows are swapped. Flux and SD3 are two such entries; issue 16's
families with plain renames are more."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence


class Renames:
    """``blocks``: (single-file block name, diffusers block name, {single-file layer: diffusers layer});
    ``top``: {single-file name: diffusers name} of the layers outside the blocks."""

    @classmethod
    def from_entry(cls, data: Mapping) -> Renames:
        """From an entry's ``{"blocks": {original: {"diffusers": ..., "layers": {...}}}, "top": {...}}``."""
        blocks = [(o, b["diffusers"], b["layers"]) for o, b in data.get("blocks", {}).items()]
        return cls(blocks, data.get("top", {}))

    def __init__(self, blocks: Sequence[tuple[str, str, Mapping[str, str]]], top: Mapping[str, str]):
        self._to_diffusers = {o: (d, dict(inner)) for o, d, inner in blocks}
        self._to_original = {d: (o, {v: k for k, v in inner.items()}) for o, d, inner in blocks}
        self._top, self._top_inv = dict(top), {v: k for k, v in top.items()}
        self.roots = frozenset({o for o, _, _ in blocks} | {k.split(".", 1)[0] for k in top})

    @staticmethod
    def _rename(path: str, blocks: Mapping[str, tuple[str, dict[str, str]]], top: Mapping[str, str]) -> str | None:
        m = re.match(r"([A-Za-z_]+)\.(\d+)\.(.*)$", path)
        if m and m.group(1) in blocks:
            block, inner = blocks[m.group(1)]
            name = inner.get(m.group(3))
            return None if name is None else f"{block}.{m.group(2)}.{name}"
        return top.get(path)

    def to_diffusers(self, path: str) -> str | None:
        """A single-file module path in diffusers names (None: the family has no such module)."""
        return self._rename(path, self._to_diffusers, self._top)

    def to_original(self, path: str) -> str | None:
        """A diffusers path in single-file names; None when the single file has no weight of that name (the
        parts of a fused q/k/v)."""
        return self._rename(path, self._to_original, self._top_inv)
