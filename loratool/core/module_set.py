"""What an adapter's module records add up to (components, kinds), shared by the canonical ``Adapter`` and
the header-only ``formats.shapes.AdapterShapes``. Imports no torch."""

from __future__ import annotations

from typing import Any


class ModuleSet:
    """Counts over ``self.modules`` (key -> a record with ``component`` and ``kind``)."""

    modules: dict[str, Any]

    def components(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.modules.values():
            counts[m.component] = counts.get(m.component, 0) + 1
        return counts

    @property
    def kinds(self) -> list[str]:
        return sorted({m.kind for m in self.modules.values()})
