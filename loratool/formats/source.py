"""The raw contents of an adapter input as the codecs see them: keys with lazy loaders, shapes,
metadata and a peft config. Files and folders are opened by ``loratool.io.sources.open_source``;
this module only reshapes what it returns (and refuses model folders, which are not adapters).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loratool.errors import LoraToolError


@dataclass
class RawSource:
    """What a reader sees: key -> tensor loader, shapes, metadata, the peft config (if any)."""

    path: str
    loaders: dict[str, Callable[[], torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None  # adapter_config.json of a peft folder
    parts: list[tuple[str, RawSource]] = field(default_factory=list)  # peft sub-folders: (component, source)

    def get(self, key: str) -> torch.Tensor:
        return self.loaders[key]()


def _raw(src, keys: list[str], strip: str = "", config: dict | None = None) -> RawSource:
    loaders = {k[len(strip):]: (lambda k=k: src.get(k)) for k in keys}
    shapes = {k[len(strip):]: tuple(src.shape(k)) for k in keys}
    return RawSource(os.fspath(src.path), loaders, shapes, dict(src.metadata or {}), config)


def open_raw(path: str | os.PathLike[str]) -> RawSource:
    """Open any adapter input for reading (file, peft folder, folder of peft folders, diffusers LoRA folder)."""
    from loratool.io.sources import open_source

    src = open_source(path)
    if src.kind in ("diffusers", "component"):
        raise LoraToolError("this is a model folder, not an adapter", path)
    if src.kind == "peft" and src.components:  # one peft folder per component
        parts = [(comp, _raw(src, [f"{comp}.{k}" for k in keys], f"{comp}.", src.config.get(comp)))
                 for comp, keys in src.components.items()]
        return RawSource(os.fspath(path), {}, {}, dict(src.metadata or {}), parts=parts)
    raw = _raw(src, list(src.keys()), config=src.config if src.kind == "peft" else None)
    raw.path = os.fspath(path)
    return raw
