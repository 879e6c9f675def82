"""Adapter file layouts (codecs) and their detection.

``read_adapter(path)`` reads any recognised input into the canonical :class:`~loratool.core.modules.Adapter`;
``decode(tensors, metadata)`` does the same for in-memory tensors. ``encode(adapter, fmt)`` gives the
tensors and metadata of a layout, ``write_adapter`` writes them (atomically).
"""

from __future__ import annotations

from loratool.formats.detect import detect_base_model, detect_keys
from loratool.formats.fuse import fold_scale, fuse_lora, split_lora
from loratool.formats.read import decode, read_adapter
from loratool.formats.write import FORMATS, canonical_format, encode, peft_config, write_adapter

__all__ = ["FORMATS", "canonical_format", "decode", "detect_base_model", "detect_keys", "encode", "fold_scale",
           "fuse_lora", "peft_config", "read_adapter", "split_lora", "write_adapter"]
