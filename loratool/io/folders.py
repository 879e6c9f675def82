"""Folders as tensor sources: diffusers pipelines, component and HF model folders (single or
sharded weights, dtype variants), peft adapter folders. Used by :func:`loratool.io.sources.open_source`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratool.errors import LoraToolError
from loratool.io.sources import COMPONENT_NAMES, WEIGHT_STEMS, MultiSource, TensorSource, open_file, read_json

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _variant_of(name: str) -> str | None:
    """``fp16`` for ``model.fp16.safetensors`` / ``model.fp16.safetensors.index.json``; None otherwise."""
    base = name[: -len(".index.json")] if name.endswith(".index.json") else name
    parts = base.split(".")
    return parts[1] if len(parts) == 3 else None


def _weight_files(folder: Path, variant: str | None) -> Path | None:
    """The weight file (or shard index) of a component folder; None when there is none."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    var = f".{variant}" if variant else ""
    for stem in WEIGHT_STEMS:
        for ext in ("safetensors", "bin"):
            single, index = f"{stem}{var}.{ext}", f"{stem}{var}.{ext}.index.json"
            if index in names:
                return folder / index
            if single in names:
                return folder / single
    if variant is None:  # only variant files (e.g. fp16): take them when there is one choice
        variants = {v for n in names if n.split(".")[0] in WEIGHT_STEMS and (v := _variant_of(n))}
        if len(variants) == 1:
            return _weight_files(folder, variants.pop())
        if len(variants) > 1:
            raise LoraToolError(f"holds weights in several variants ({', '.join(sorted(variants))}); "
                                "say which one to read", folder)
    return None


def _component_where(folder: Path, variant: str | None, prefix: str,
                     opened: dict[Path, TensorSource]) -> dict[str, tuple[Path, str]] | None:
    """``prefix + param -> (file, param)`` for one component folder (None: no weights there)."""
    found = _weight_files(folder, variant)
    if found is None:
        return None
    if found.name.endswith(".index.json"):
        index = read_json(found, "the shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoraToolError("the shard index has no weight_map of names to files", found)
        for shard in sorted(set(weight_map.values())):
            if "/" in shard or "\\" in shard or not (folder / shard).is_file():
                raise LoraToolError(f"the shard index names {shard!r}, which is not a file beside it", found)
        return {prefix + k: (folder / v, k) for k, v in sorted(weight_map.items())}
    src = opened[found] = open_file(found)
    return {prefix + k: (found, k) for k in src.keys()}


def open_diffusers(folder: Path, variant: str | None = None, *, indexed: bool = True) -> MultiSource:
    """A diffusers pipeline folder: every component folder that holds weights. ``indexed=False``:
    a folder of component folders without ``model_index.json`` (every sub-folder is tried)."""
    index = read_json(folder / "model_index.json", "model_index.json") if indexed else None
    if index is not None:
        listed = [k for k, v in index.items() if isinstance(v, list) and (folder / k).is_dir()]
        names = listed + [n for n in COMPONENT_NAMES if n not in listed and (folder / n).is_dir()]
    else:
        names = sorted(d.name for d in folder.iterdir() if d.is_dir())
    where: dict[str, tuple[Path, str]] = {}
    components: dict[str, list[str]] = {}
    opened: dict[Path, TensorSource] = {}
    try:
        for name in names:
            part = _component_where(folder / name, variant, f"{name}.", opened)
            if part:
                where.update(part)
                components[name] = [k[len(name) + 1:] for k in part]
    except BaseException:
        for src in opened.values():
            src.close()
        raise
    if not components:
        if index is None:
            raise LoraToolError("nothing loratool can read in this folder", folder)
        raise LoraToolError("a diffusers folder (model_index.json) without any component weights", folder)
    source = MultiSource(folder, "diffusers", where)
    source._open.update(opened)
    source.config = index
    source.components = components
    return source


def has_component_folders(folder: Path) -> bool:
    """Whether some sub-folder of ``folder`` holds a component's weights (a pipeline folder that
    lacks its ``model_index.json``)."""
    for sub in folder.iterdir():
        if sub.is_dir() and any(p.name.split(".")[0] in WEIGHT_STEMS and p.name.endswith(_WEIGHT_SUFFIXES)
                                for p in sub.iterdir() if p.is_file()):
            return True
    return False


def open_component(folder: Path, variant: str | None = None) -> MultiSource | None:
    opened: dict[Path, TensorSource] = {}
    where = _component_where(folder, variant, "", opened)
    if where is None:
        return None
    source = MultiSource(folder, "component", where)
    source._open.update(opened)
    if (folder / "config.json").is_file():
        source.config = read_json(folder / "config.json", "config.json")
    source.components = {folder.name: list(where)}
    return source


def open_peft(folder: Path) -> TensorSource:
    config = read_json(folder / "adapter_config.json", "adapter_config.json")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            src = open_file(folder / name)
            src.kind = "peft"
            src.config = config
            return src
    raise LoraToolError("a peft folder (adapter_config.json) without adapter_model.safetensors or "
                        "adapter_model.bin", folder)


def open_peft_components(folder: Path) -> MultiSource | None:
    """A folder of peft sub-folders (``unet/adapter_config.json``, ``text_encoder/…``): keys are
    ``"<component>.<key>"`` and ``.config`` maps each component to its adapter_config.json."""
    subs = sorted(d for d in folder.iterdir() if d.is_dir() and (d / "adapter_config.json").is_file())
    if not subs:
        return None
    where: dict[str, tuple[Path, str]] = {}
    configs: dict[str, Any] = {}
    components: dict[str, list[str]] = {}
    opened: dict[Path, TensorSource] = {}
    try:
        for sub in subs:
            part = open_peft(sub)
            opened[Path(part.path)] = part
            configs[sub.name] = part.config
            components[sub.name] = part.keys()
            where.update({f"{sub.name}.{k}": (Path(part.path), k) for k in part.keys()})
    except BaseException:
        for src in opened.values():
            src.close()
        raise
    source = MultiSource(folder, "peft", where)
    source._open.update(opened)
    source.config = configs
    source.components = components
    source.metadata = dict(next(iter(opened.values())).metadata)
    return source
