"""Adapter file layouts (codecs) and their detection.

``read_adapter(path)`` reads any recognised input into the canonical :class:`~loratool.core.modules.Adapter`;
``decode(tensors, metadata, config)`` does the same for in-memory tensors. ``encode(adapter, fmt)`` gives the
tensors and metadata of a layout, ``write_adapter`` writes them (atomically; peft as a folder).

Layouts read (``Adapter.source_format``; a list when one file mixes several): ``kohya``, ``lycoris``,
``onetrainer``, ``diffusers-attnproc``, ``diffusers-old`` (``lora.down``/``lora_linear_layer``),
``diffusers-peft``, ``peft``, ``flux-bfl``, ``flux-aitoolkit``, ``flux-xlabs``, ``ldm`` (ComfyUI-native SD),
``cloneofsimo``, ``textual-inversion``. Layouts written: ``kohya`` (aliases ``webui``, ``comfyui``,
``a1111``, ``forge``, ``lycoris``), ``diffusers``, ``peft``, ``aitoolkit`` and ``bfl`` (Flux).

Files: ``keys`` (one key -> family, module, role), ``detect`` (key report, base model), ``build`` (roles ->
modules), ``read``/``source`` (inputs), ``kohya``/``diffusers``/``peftcfg``/``flux``/``special`` (layouts),
``write`` (targets, metadata), ``fuse`` (exact fuse/split/fold of LoRA factors), ``names``/``archinfo``
(module names: the arch tables first, spelling rules as fallback).
"""

from __future__ import annotations

from loratool.formats.detect import detect_base_model, detect_keys
from loratool.formats.fuse import fold_scale, fuse_lora, split_lora
from loratool.formats.read import decode, read_adapter
from loratool.formats.write import FORMATS, canonical_format, encode, peft_config, write_adapter

__all__ = ["FORMATS", "canonical_format", "decode", "detect_base_model", "detect_keys", "encode", "fold_scale",
           "fuse_lora", "peft_config", "read_adapter", "split_lora", "write_adapter"]
