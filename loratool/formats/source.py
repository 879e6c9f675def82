"""The raw contents of an adapter input: tensor keys (lazily loaded), metadata, and a peft config.

Uses ``loratool.io.sources.open_source`` when it exists; otherwise opens the handful of input kinds
itself (a safetensors file, a weights-only pickle, a peft folder, a diffusers LoRA folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratool.errors import LoraToolError

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")


@dataclass
class RawSource:
    """What a reader sees: key -> tensor loader, shapes, metadata, the peft config (if any)."""

    path: str
    loaders: dict[str, Callable[[], torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None  # adapter_config.json of a peft folder
    structure: object = None  # a pickle's top-level object when it is not a flat dict (legacy lists)
    parts: list[tuple[str, RawSource]] = field(default_factory=list)  # peft sub-folders: (component, source)

    def get(self, key: str) -> torch.Tensor:
        return self.loaders[key]()


def _from_safetensors(path: Path) -> RawSource:
    from loratool.io.safetensors import SafetensorsFile

    f = SafetensorsFile(path)
    loaders = {k: (lambda k=k: f.get(k)) for k in f.keys()}
    shapes = {k: tuple(f.info(k).shape) for k in f.keys()}
    return RawSource(os.fspath(path), loaders, shapes, dict(f.metadata or {}))


def _from_pickle(path: Path) -> RawSource:
    try:
        from loratool.io.pickles import load_pickle  # type: ignore[attr-defined]

        obj = load_pickle(path)
    except ImportError:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user-facing refusal
            raise LoraToolError(f"cannot be read with the weights-only loader ({type(e).__name__}); "
                                "convert it to safetensors", path) from None
    return _from_object(path, obj)


def _flatten(obj: object, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def _from_object(path: Path, obj: object) -> RawSource:
    if isinstance(obj, (list, tuple)):
        tensors = {str(i): t for i, t in enumerate(obj) if isinstance(t, torch.Tensor)}
        src = RawSource(os.fspath(path), {k: (lambda t=t: t) for k, t in tensors.items()},
                        {k: tuple(t.shape) for k, t in tensors.items()}, structure=obj)
        return src
    flat: dict[str, torch.Tensor] = {}
    _flatten(obj, "", flat)
    meta = {}
    if isinstance(obj, dict):
        meta = {str(k): str(v) for k, v in obj.items() if isinstance(v, (str, int, float))}
    return RawSource(os.fspath(path), {k: (lambda t=t: t) for k, t in flat.items()},
                     {k: tuple(t.shape) for k, t in flat.items()}, meta, structure=obj)


def _open_file(path: Path) -> RawSource:
    if path.suffix.lower() == ".safetensors":
        return _from_safetensors(path)
    if path.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt"):
        return _from_pickle(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return _from_pickle(path)
    return _from_safetensors(path)


def _peft_folder(folder: Path) -> RawSource | None:
    cfg = folder / "adapter_config.json"
    if not cfg.is_file():
        return None
    weights = next((folder / n for n in PEFT_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise LoraToolError("peft folder has adapter_config.json but no adapter_model.safetensors", folder)
    try:
        config = json.loads(cfg.read_text())
    except ValueError as e:
        raise LoraToolError(f"adapter_config.json is not valid JSON ({e})", cfg) from None
    if not isinstance(config, dict):
        raise LoraToolError("adapter_config.json is not a JSON object", cfg)
    src = _open_file(weights)
    src.config = config
    src.path = os.fspath(folder)
    return src


def open_raw(path: str | os.PathLike[str]) -> RawSource:
    """Open any adapter input for reading (file, peft folder, folder of peft folders, diffusers folder)."""
    p = Path(path)
    if not p.exists():
        raise LoraToolError("no such file or folder", p)
    if p.is_file():
        return _open_file(p)
    single = _peft_folder(p)
    if single is not None:
        return single
    for name in DIFFUSERS_WEIGHTS:
        if (p / name).is_file():
            return _open_file(p / name)
    parts = [(sub.name, s) for sub in sorted(p.iterdir()) if sub.is_dir() and (s := _peft_folder(sub)) is not None]
    if parts:
        return RawSource(os.fspath(p), {}, {}, parts=parts)
    raise LoraToolError("folder holds no adapter (no adapter_config.json, no pytorch_lora_weights.*)", p)
