"""The adapters that ``mix``, ``merge`` and ``scale``-like commands combine, read from their input specs.

``PATH[:WEIGHT][:lbw=BLOCKS]`` is parsed by :func:`loratool.ops.lbw.parse_input_spec`; this module reads
each file (any layout) into a :class:`~loratool.ops.mix.MixInput` with its weight and block weights.
"""

from __future__ import annotations

from collections.abc import Iterable

from loratool.errors import LoraToolError
from loratool.ops.lbw import InputSpec, parse_input_spec
from loratool.ops.mix import MixInput


def parse_inputs(texts: Iterable[str]) -> list[InputSpec]:
    """Each command-line spec parsed (the file must exist); nothing is read yet."""
    return [parse_input_spec(text) for text in texts]


def read_inputs(specs: Iterable[str | InputSpec]) -> list[MixInput]:
    """A ``MixInput`` per spec (text or parsed), its file read in any layout; a file without adapter
    modules is refused."""
    from loratool.formats import read_adapter, require_complete

    out = []
    for item in specs:
        spec = parse_input_spec(item) if isinstance(item, str) else item
        adapter = read_adapter(spec.path)
        require_complete(adapter, spec.path)
        if not adapter.modules:
            raise LoraToolError("holds no adapter modules", spec.path)
        out.append(MixInput(adapter, spec.weight, spec.lbw, name=spec.path))
    return out
