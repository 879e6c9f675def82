"""Input specs (``PATH[:weight][:lbw=...]``) and LoRA Block Weight: one strength per module.

The spec parser is the one place the command line's ``PATH:WEIGHT:BLOCKS`` syntax is read, for
``mix``, ``merge`` and ``scale`` alike. Which block a module belongs to, and what a preset or a
12/17/20/26-value vector means, is data in ``loratool.arch`` (``load_arch(name).modules[key].block``
and ``lbw_weights(arch_name, spec)``); this module only combines the two.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from loratool.core.modules import Adapter
from loratool.errors import LoraToolError


@dataclass(frozen=True)
class InputSpec:
    """One input on the command line: a file, its weight, and an optional block-weight spec."""

    path: str
    weight: float = 1.0
    lbw: str | None = None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_input_spec(text: str, *, must_exist: bool = True) -> InputSpec:
    """``PATH``, ``PATH:W``, ``PATH:W:lbw=SPEC``, ``PATH:lbw=SPEC`` or ``PATH:W:SPEC`` (supermerger).

    A path that exists exactly as written wins, so a file whose name contains ``:`` still works.
    """
    if os.path.exists(text):
        return InputSpec(text)
    parts = text.split(":")
    weight, lbw = 1.0, None
    if len(parts) >= 2 and parts[-1].lower().startswith("lbw="):
        lbw = parts.pop()[4:]
    if len(parts) >= 2 and _number(parts[-1]) is not None:
        weight = float(parts.pop())
    elif lbw is None and len(parts) >= 3 and _number(parts[-2]) is not None:
        lbw = parts.pop()
        weight = float(parts.pop())
    path = ":".join(parts)
    if lbw is not None and not lbw.strip():
        raise LoraToolError(f"empty block-weight spec in {text!r}", path)
    if weight != weight or weight in (float("inf"), float("-inf")):
        raise LoraToolError(f"weight in {text!r} is not a finite number", path)
    if must_exist and not os.path.exists(path):
        if ":" in path:
            raise LoraToolError(
                f"no such file; {text!r} was read as PATH[:WEIGHT][:lbw=BLOCKS] and the path part still "
                "contains ':' (is the weight a number?)", path)
        raise LoraToolError("no such file", path)
    return InputSpec(path, weight, lbw)


@dataclass
class BlockWeights:
    """The strength of every module of one adapter: ``weight × block weight``."""

    weights: dict[str, float]
    unblocked: list[str] = field(default_factory=list)  # modules the arch table gives no block
    blocks: dict[str, float] = field(default_factory=dict)  # block -> weight, as resolved


def _arch_tables(arch_name: str, spec: str, path: str | None, adapter: Adapter | None = None):
    try:
        from loratool.arch import canonical_family, family_for, lbw_weights, load_arch
    except ImportError:
        raise LoraToolError("block weights need the architecture tables, which this build lacks", path) from None
    try:
        same = adapter is not None and canonical_family(arch_name) == canonical_family(adapter.base_model)
        arch = family_for(adapter).table if same else load_arch(arch_name)  # a rules family at the file's sizes
        table = lbw_weights(arch_name, spec, arch)
    except LoraToolError:
        raise
    except (KeyError, ValueError) as e:
        raise LoraToolError(f"block weights {spec!r} for {arch_name}: {e}", path) from None
    return arch, table


def _block_value(table: Mapping[str, float] | object, block: str) -> float:
    if isinstance(table, Mapping):
        return float(table.get(block, 1.0))
    return float(table(block))  # a callable block -> weight


def module_weights(adapter: Adapter, weight: float, lbw: str | None = None, *,
                   arch_name: str | None = None, path: str | None = None) -> BlockWeights:
    """Each module's strength: ``weight``, times its block's weight when ``lbw`` is given.

    ``arch_name`` defaults to the adapter's base model; block weights on an adapter whose base
    model is unknown are refused (the blocks would be guesses).
    """
    if lbw is None:
        return BlockWeights({k: weight for k in adapter.modules})
    name = arch_name or adapter.base_model
    if not name or name == "unknown":
        raise LoraToolError("block weights need to know the base model (sd1, sdxl, ...); pass --arch", path)
    arch, table = _arch_tables(name, lbw, path, adapter)
    out = BlockWeights({})
    for key in adapter.modules:
        spec = arch.modules.get(key)
        block = getattr(spec, "block", None) if spec is not None else None
        if block is None:
            out.unblocked.append(key)
            out.weights[key] = weight
            continue
        value = _block_value(table, block)
        if not math.isfinite(value) or not math.isfinite(weight * value):
            raise LoraToolError(f"block weights {lbw!r}: module {key} (block {block}) would get the weight "
                                f"{weight:g} × {value:g}, not a finite number", path)
        out.blocks[block] = value
        out.weights[key] = weight * value
    return out
