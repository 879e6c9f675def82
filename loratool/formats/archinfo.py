"""The codecs' window on the architecture tables (``loratool.arch``): names and shapes.

Every question goes to the tables first; when a table is missing (a model we have no table for,
or the tables not installed) the answer is None and the codec uses its own spelling rules.
"""

from __future__ import annotations

from functools import cache

BASES = ("sd1", "sd2", "sdxl", "flux", "sd3")


@cache
def arch(base: str):
    """The architecture table of ``base``, or None when there is none."""
    try:
        from loratool.arch import load_arch  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        return load_arch(base)
    except Exception:  # noqa: BLE001 - a missing or broken table means "no table", the codec falls back
        return None


def module_shape(base: str, key: str) -> tuple[int, ...] | None:
    a = arch(base)
    spec = a.modules.get(key) if a is not None else None
    return tuple(spec.shape) if spec is not None else None


def shape_for(base: str, key: str, numel: int) -> tuple[int, ...] | None:
    """The weight shape of ``key`` with ``numel`` elements: from ``base``'s table, or (base unknown) any table."""
    for b in (base,) if base in BASES else BASES:
        shape = module_shape(b, key)
        if shape is not None and _numel(shape) == numel:
            return shape
    return None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def from_kohya(module_id: str) -> str | None:
    """The canonical key of a kohya module id according to any table that knows it."""
    found = from_kohya_with_base(module_id)
    return found[0] if found else None


def rows_swapped(base: str, key: str) -> bool | None:
    """Whether the SAI/BFL weight of ``key`` holds its rows in the other half order ([shift, scale] vs
    diffusers' [scale, shift]); None when no table knows the module."""
    a = arch(base)
    spec = a.modules.get(key) if a is not None else None
    if spec is None:
        return None
    return spec.row_order is not None


def from_kohya_with_base(module_id: str) -> tuple[str, str] | None:
    """(canonical key, base) of a kohya module id, from the first table that knows it."""
    for base in BASES:
        a = arch(base)
        if a is None:
            continue
        try:
            key = a.from_kohya(module_id)
        except Exception:  # noqa: BLE001
            key = None
        if key:
            return key, base
    return None


def to_kohya(base: str, key: str) -> str | None:
    a = arch(base)
    if a is None or key not in a.modules or getattr(a.modules[key], "fused_in", None):
        return None  # a part of a fused weight has no kohya name of its own
    try:
        return a.to_kohya(key)
    except Exception:  # noqa: BLE001
        return None


def fused_parts(base: str, key: str) -> list[tuple[str, tuple[int, int]]] | None:
    a = arch(base)
    if a is None:
        return None
    return getattr(a, "fused", {}).get(key)
