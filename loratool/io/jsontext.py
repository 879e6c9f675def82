"""JSON text from files (safetensors headers, metadata values, adapter and model configs), parsed within
bounds: nesting depth, length, and numbers that must be finite.

``json.loads`` alone accepts ``NaN``/``Infinity``, turns ``1e400`` into ``inf`` and recurses until Python's
recursion limit; every structure it returns would then be walked by code that recurses too. Here every
such input is a :class:`ValueError` subclass the caller turns into its one-line error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 64  # configs and metadata nest a few levels; a header three
MAX_CHARS = 100_000_000


class JsonLimit(ValueError):
    """Nested deeper, or longer, than any real file of its kind."""


class NonFinite(ValueError):
    """A number JSON cannot hold: ``NaN``, ``Infinity`` or one out of float range (``1e400``)."""


def _constant(token: str) -> float:
    raise NonFinite(f"it holds a non-finite number ({token})")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise NonFinite(f"it holds a number out of range ({token[:40]})")
    return value


def parse_json(text: str | bytes, *, max_depth: int = MAX_DEPTH, allow_non_finite: bool = False,
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads`` within bounds: :class:`JsonLimit` past ``max_depth`` levels or :data:`MAX_CHARS`,
    :class:`NonFinite` for a non-finite number (unless ``allow_non_finite``: then they parse as floats,
    for display), ``ValueError`` for text that is not JSON."""
    if len(text) > MAX_CHARS:
        raise JsonLimit(f"it is longer than {MAX_CHARS:,} characters")
    hooks: dict[str, Any] = {} if allow_non_finite else {"parse_constant": _constant, "parse_float": _finite_float}
    try:
        data = json.loads(text, object_pairs_hook=object_pairs_hook, **hooks)
    except RecursionError:
        raise JsonLimit(f"it is nested more than {max_depth} levels deep") from None
    check_depth(data, max_depth)
    return data


def check_depth(data: Any, max_depth: int = MAX_DEPTH) -> None:
    """:class:`JsonLimit` when lists/objects nest more than ``max_depth`` levels (an iterative walk)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise JsonLimit(f"it is nested more than {max_depth} levels deep")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
