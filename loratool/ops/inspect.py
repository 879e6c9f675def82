"""What ``loratool inspect`` reports about an adapter file, as plain JSON-ready data.

:func:`build_report` is pure: an adapter plus the facts read from the file's header (:class:`FileFacts`) in,
a dict out. The adapter is the canonical :class:`~loratool.core.modules.Adapter` or its header-only form
(:class:`~loratool.formats.shapes.AdapterShapes`: the same fields, shapes without tensors); the report reads
shapes, dtypes and alphas only, unless ``modules=True`` asks for each module's ‖ΔW‖_F (tensors, then torch).
:func:`inspect_file` is the thin I/O wrapper the CLI and benchmarks use: without ``modules`` it reads the
header alone (``formats.read_summary``), so that ``inspect`` does not import torch.

‖ΔW‖_F of a LoRA is computed on the factors, never on the dense product:
``‖up·down‖_F² = tr((upᵀup)(down downᵀ))``, two ``r×r`` Gram matrices (float64).
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loratool.arch import canonical_family, family, family_from_metadata, naming
from loratool.errors import LoraToolError
from loratool.ops.ratio import adapter_ratio, module_trained_params

if TYPE_CHECKING:
    import torch

    from loratool.core.modules import Adapter, LoraModule
    from loratool.formats.shapes import AdapterShapes

SCHEMA_VERSION = 1


@dataclass
class FileFacts:
    """What the file itself says, independent of how its keys are understood."""

    path: str
    size_bytes: int
    dtypes: dict[str, int] = field(default_factory=dict)  # stored dtype -> number of tensors
    tensors: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    hash_ok: bool | None = None  # None: no hash stored, or not checked
    hash_checked: bool = False
    container: str = "safetensors"  # safetensors, pickle, folder


# -- ΔW norms on factors -----------------------------------------------------------------------


def lora_delta_norm(module: LoraModule, dtype: torch.dtype | None = None) -> float:
    """‖ΔW‖_F of a LoRA/LoCon module on its factors (the scale included), through ``r×r`` Gram
    matrices computed in ``dtype`` (default float32; :func:`loratool.linalg.product_norm`)."""
    import torch

    from loratool.core.modules import flat2d
    from loratool.linalg import product_norm

    norm = product_norm(flat2d(module.up), flat2d(module.down), module.mid, dtype or torch.float32)
    return abs(module.scale) * norm


@contextmanager
def _one_thread():
    """Run per-module math on one intra-op thread. The products are small and many (one set per
    module); each multi-threaded op pays a fork/join, which on a busy 2-core machine measured
    ~12 ms per op against ~50 µs on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def delta_norm(module) -> float:
    """‖ΔW‖_F of any module; LoRA on its factors, other kinds on their (small) dense ΔW."""
    import torch

    from loratool.core.modules import LoraModule

    if isinstance(module, LoraModule):
        return lora_delta_norm(module)
    return float(module.delta(torch.float64).norm())


def block_of(module) -> str:
    """A readable block label (``unet:<block>.<index>``, ``text_encoder:layers.5``): the registry's."""
    return naming.block_label(module.component, module.path)


def block_sort_key(label: str, base_model: str = "generic") -> tuple:
    """Blocks in model order as the base model's family orders them (down -> mid -> up for a UNet)."""
    return family(canonical_family(base_model) or "generic").block_sort_key(label)


# -- the report --------------------------------------------------------------------------------


def _dtype_name(t) -> str:
    """The safetensors name of a tensor's dtype (a header-only record carries the name itself)."""
    if isinstance(t.dtype, str):
        return t.dtype
    from loratool.io.dtypes import names_by_torch

    return names_by_torch().get(t.dtype, str(t.dtype).removeprefix("torch."))


def _num(x: float) -> float | int:
    """An alpha or scale as JSON shows it: integral values as ints."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def _sorted_distinct(values) -> list:
    present = sorted({v for v in values if v is not None})
    return ([None] if any(v is None for v in values) else []) + present


def module_details(module, with_norm: bool) -> dict[str, Any]:
    """One row of ``inspect --modules``."""
    tensors = module.tensors()
    row: dict[str, Any] = {
        "key": module.key,
        "kind": module.kind,
        "shape": list(module.weight_shape),
        "rank": module.rank,
        "alpha": None if module.alpha is None else _num(module.alpha),
        "scale": _num(module.scale),
        "dtype": _dtype_name(tensors[0]) if tensors else None,
        "params": module_trained_params(module),
        "dora": module.dora is not None,
        "bias": module.bias is not None,
    }
    if with_norm:
        row["delta_norm"] = delta_norm(module)
    return row


def _rank_summary(mods: list) -> dict[str, Any]:
    ranks = [m.rank for m in mods]
    hist = Counter(r for r in ranks if r is not None)
    alphas = [None if m.alpha is None else _num(m.alpha) for m in mods]
    return {
        "ranks": sorted(hist),
        "rank_histogram": {str(r): hist[r] for r in sorted(hist)},
        "alphas": _sorted_distinct(alphas),
        "scales": _sorted_distinct([_num(m.scale) for m in mods]),
    }


def _adapter_dtypes(adapter: Adapter | AdapterShapes) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for m in adapter.modules.values():
        for t in m.tensors():
            counts[_dtype_name(t)] += 1
    for t in adapter.embeddings.values():
        counts[_dtype_name(t)] += 1
    return dict(sorted(counts.items()))


def base_from_metadata(version: str | None) -> str | None:
    """Our base-model name for an ``ss_base_model_version`` value (None when unrecognised)."""
    return family_from_metadata({"ss_base_model_version": version}) if version else None


def describe(metadata: Mapping[str, str], top_tags: int = 10) -> dict[str, Any]:
    """The readable metadata summary (kohya ``ss_*``, ``modelspec.*``) plus the number of keys."""
    from loratool.io.metadata import describe_metadata

    out = describe_metadata(metadata, top_tags)
    out["top_tags"] = [[tag, n] for tag, n in out.get("top_tags", [])]
    out["keys"] = len(metadata)
    known = ("ss_", "sshs_", "modelspec.", "loratool.")
    out["other_keys"] = sorted(k for k in metadata if not k.startswith(known))
    return out


def build_report(adapter: Adapter | AdapterShapes, facts: FileFacts, *, modules: bool = False, top_tags: int = 10) -> dict[str, Any]:
    """The inspect report of one file (JSON-ready; the schema is documented in the CLI help).

    With ``modules=True`` it adds ``module_details`` (one row per module, with ‖ΔW‖_F) and
    ``blocks`` (‖ΔW‖_F per block: the root of the sum of its modules' squared norms).
    """
    mods = list(adapter.modules.values())
    ratio = adapter_ratio(adapter)
    total = ratio["total"]
    params = int(total["adapter_params"]) + sum(t.numel() for t in adapter.embeddings.values())
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "path": facts.path,
        "size_bytes": facts.size_bytes,
        "container": facts.container,
        "format": adapter.source_format or None,
        "base_model": adapter.base_model,
        "empty": not mods and not adapter.embeddings and not adapter.unknown,
        "kinds": adapter.kinds,
        "modules": len(mods),
        "components": dict(sorted(adapter.components().items())),
        **_rank_summary(mods),
        "dtypes": dict(facts.dtypes) if facts.dtypes else _adapter_dtypes(adapter),
        "tensors": facts.tensors,
        "params": params,
        "module_params": int(total["adapter_params"]),
        "full_params": total["full_params"],
        "reduction_ratio": total["ratio"],
        "ratio_by_component": ratio["components"],
        "conv_modules": sum(1 for m in mods if m.kind != "norm" and m.is_conv),
        "dora_modules": sum(1 for m in mods if m.dora is not None),
        "bias_modules": sum(1 for m in mods if m.bias is not None),
        "embeddings": {tok: list(t.shape) for tok, t in adapter.embeddings.items()},
        "unknown_keys": list(adapter.unknown),
        "metadata": describe(facts.metadata or adapter.metadata, top_tags),
        "hash_ok": facts.hash_ok,
        "metadata_base_model": base_from_metadata((facts.metadata or adapter.metadata).get("ss_base_model_version")),
        "base_model_detection": adapter.detection.to_json() if adapter.detection else None,
        "hash_checked": facts.hash_checked,
    }
    if modules:
        with _one_thread():
            rows = [module_details(m, True) for m in mods]
        report["module_details"] = rows
        blocks: dict[str, float] = {}
        for m, row in zip(mods, rows, strict=True):
            label = block_of(m)
            blocks[label] = blocks.get(label, 0.0) + row["delta_norm"] ** 2
        order = functools.partial(block_sort_key, base_model=adapter.base_model)
        report["blocks"] = {b: math.sqrt(blocks[b]) for b in sorted(blocks, key=order)}
    return report


# -- reading -----------------------------------------------------------------------------------


def _path_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    return os.path.getsize(path)


HASH_AUTO_LIMIT = 256 << 20  # data bytes hashed without being asked (~0.25 s at 1 GB/s)


def _light_header(path: str) -> tuple[dict[str, int], int, dict[str, str], int]:
    """(dtype counts, tensors, metadata, file size) of a safetensors file the strict reader has
    already accepted: one read and a ``json.loads``, no validation."""
    import json

    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        size = os.fstat(fh.fileno()).st_size
    metadata = header.pop("__metadata__", None) or {}
    dtypes = Counter(str(entry.get("dtype")) for entry in header.values())
    return dict(sorted(dtypes.items())), len(header), dict(metadata), size


def read_facts(path: str | os.PathLike[str], *, check_hash: bool | None = None,
               validated: bool = False) -> FileFacts:
    """Header facts of a file: size, stored dtypes, metadata and (for safetensors) whether the
    stored ``sshs_model_hash`` is right. That check streams the whole data region through
    SHA-256 (about 1 GB/s), so ``check_hash=None`` (auto) does it only when the data region is at
    most :data:`HASH_AUTO_LIMIT`; True always, False never. ``validated=True`` says the strict
    reader has already accepted the file, so the header is only parsed, not checked again."""
    from loratool.io.safetensors import SafetensorsFile, is_safetensors_path, looks_like_safetensors

    p = os.fspath(path)
    if not os.path.exists(p):
        raise LoraToolError("no such file", p)
    if os.path.isdir(p):
        weights = os.path.join(p, "adapter_model.safetensors")  # a peft folder: its one tensor file
        if not os.path.isfile(weights):
            return FileFacts(p, _path_size(p), container="folder")
        inner = read_facts(weights, check_hash=check_hash, validated=validated)
        inner.path, inner.size_bytes, inner.container = p, _path_size(p), "folder"
        return inner
    if not (is_safetensors_path(p) or looks_like_safetensors(p)):  # renamed safetensors files exist
        return FileFacts(p, _path_size(p), container="pickle")
    if validated:
        dtypes, count, metadata, size = _light_header(p)
        facts = FileFacts(p, size, dtypes, count, metadata)
    else:
        with SafetensorsFile(p) as f:
            dtypes = Counter(i.dtype for i in f.tensors.values())
            facts = FileFacts(p, f.file_size, dict(sorted(dtypes.items())), len(f), dict(f.metadata))
    if check_hash is None:
        check_hash = facts.size_bytes <= HASH_AUTO_LIMIT
    if check_hash and "sshs_model_hash" in facts.metadata:
        from loratool.io.hashes import check_hash as _check

        facts.hash_ok = _check(p)
        facts.hash_checked = True
    return facts


def inspect_file(path: str | os.PathLike[str], *, modules: bool = False,
                 check_hash: bool | None = None, top_tags: int = 10) -> dict[str, Any]:
    """Read one adapter and build its report: from the header alone (no torch) unless ``modules`` asks for
    ‖ΔW‖_F or the layout needs its tensors read (``formats.read_summary``).

    The strict reader goes first, so a bad file is refused with its message before anything else."""
    from loratool.formats.shapes import read_summary

    p = os.fspath(path)
    if not os.path.exists(p):
        raise LoraToolError("no such file", p)
    if modules:
        from loratool.formats.read import read_adapter

        adapter = read_adapter(p)
    else:
        adapter = read_summary(p)
    facts = read_facts(p, check_hash=check_hash, validated=True)
    return build_report(adapter, facts, modules=modules, top_tags=top_tags)
