"""Adapter file layouts (codecs) and their detection.

``read_adapter(path)`` reads any recognised input into the canonical :class:`~loratool.core.modules.Adapter`;
``read_shapes(path)`` the same from the header alone, without torch (``shapes.py``: modules as shapes, no tensors);
``decode(tensors, metadata, config)`` does the same for in-memory tensors. ``encode(adapter, layout)`` gives the
tensors and metadata of a layout, ``write_adapter`` writes them (atomically; peft as a folder).
``output_layout(adapter, requested)`` is the one rule for which layout an operation writes.

Layouts (``layouts.py``: one name set for reading, writing and ``--to``): ``kohya``, ``lycoris``, ``onetrainer``,
``diffusers``, ``diffusers-old``, ``diffusers-attnproc``, ``peft``, ``aitoolkit``, ``bfl``, ``ldm``,
``textual-inversion``; read only: ``xlabs``, ``cloneofsimo``. ``Adapter.source_format`` is one of them (a list
when one file mixes several).

Files: ``keys`` (one key -> layout, module name as written, role; torch-free), ``detect`` (the key report),
``read``/``source`` (inputs), ``build`` (roles -> modules), ``kohya``/``diffusers``/``original``/``special``
(the codecs), ``write`` (metadata, files), ``fuse`` (exact fuse/split/fold of LoRA factors), ``peftcfg``
(peft's alpha bookkeeping). Module names are never spelt here: the family registry (``loratool.arch``) resolves
and spells them. Importing this package imports no torch; the names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "detect_keys": "detect", "decode": "read", "read_adapter": "read", "require_complete": "read", "encode": "write",
    "write_adapter": "write", "peft_config": "write", "canonical_format": "write", "FORMATS": "layouts",
    "fold_scale": "fuse", "fuse_lora": "fuse", "split_lora": "fuse", "output_layout": "layouts",
    "layout": "layouts", "LAYOUTS": "layouts", "OutputChoice": "layouts", "read_shapes": "shapes",
    "read_summary": "shapes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loratool.formats' has no attribute {name!r}")
    return getattr(importlib.import_module(f"loratool.formats.{module}"), name)
