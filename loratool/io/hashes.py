"""The hashes web UIs and Civitai use to identify an adapter file (reference/kohya.md §5.4).

* ``sshs_model_hash``: SHA-256 (full hex) of the file's data region, everything after the
  8-byte length and the header. It does not depend on the metadata, so it can be computed from
  the tensors before the file is written, and checked on a file by streaming its data region.
* ``sshs_legacy_hash``: SHA-256 of the 64 KiB at offset 1 MiB of the serialisation that holds
  only the ``ss_*`` metadata (header included), first 8 hex characters. Files shorter than
  1 MiB hash fewer (or zero) bytes, which gives ``e3b0c442`` for an empty window.

Both are computed from the bytes exactly as they are (or will be) written: cast tensors first.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from loratool.io.safetensors import SafetensorsFile, TensorInfo
from loratool.io.writer import build_header, header_bytes, ordered_names, reference_order, tensor_bytes

if TYPE_CHECKING:
    import torch

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
CHUNK = 1 << 22  # bytes hashed per step when streaming a file


def ss_only(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The metadata kohya keeps when it serialises for the legacy hash."""
    return {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}


def _tensor_chunks(tensors: Mapping[str, torch.Tensor]) -> Iterator[memoryview]:
    for name in ordered_names(tensors):
        yield tensor_bytes(tensors[name])


def _window_hash(chunks: Iterator[bytes | memoryview], start: int, length: int) -> str:
    """SHA-256 of bytes [start, start+length) of a stream given as consecutive chunks."""
    h = hashlib.sha256()
    pos = 0
    end = start + length
    for chunk in chunks:
        n = len(chunk)
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            h.update(chunk[lo - pos:hi - pos])
        pos += n
        if pos >= end:
            break
    return h.hexdigest()


def model_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """``sshs_model_hash`` of the file these tensors will make (the data region's SHA-256)."""
    h = hashlib.sha256()
    for chunk in _tensor_chunks(tensors):
        h.update(chunk)
    return h.hexdigest()


def legacy_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """``sshs_legacy_hash``: kohya's 64 KiB window at 1 MiB of the ``ss_*``-only serialisation."""
    head, _ = build_header(tensors, ss_only(metadata))

    def chunks() -> Iterator[bytes | memoryview]:
        yield head
        yield from _tensor_chunks(tensors)

    return _window_hash(chunks(), LEGACY_OFFSET, LEGACY_LENGTH)[:8]


def tensor_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Both ``sshs_*`` values for tensors about to be written with this metadata."""
    return {"sshs_model_hash": model_hash(tensors), "sshs_legacy_hash": legacy_hash(tensors, metadata)}


def _data_chunks(f: SafetensorsFile, start: int = 0) -> Iterator[bytes]:
    """The data region of an open file, from ``start``, in bounded chunks (never whole)."""
    pos, end = start, f.file_size - f.data_start
    while pos < end:
        block = f.read_bytes(pos, min(CHUNK, end - pos))
        pos += len(block)
        yield block


def file_model_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a safetensors file's data region, streamed."""
    with SafetensorsFile(path) as f:
        h = hashlib.sha256()
        for chunk in _data_chunks(f):
            h.update(chunk)
        return h.hexdigest()


def file_legacy_hash(path: str | os.PathLike[str], *, padded: bool = True) -> str:
    """``sshs_legacy_hash`` recomputed from a file: what kohya's serialisation of the same tensors
    with only the ``ss_*`` metadata holds in its 64 KiB window at 1 MiB.

    The header is rebuilt (``padded=False``: as safetensors before 0.3 wrote it, without the
    8-byte alignment, which shifts the window); only the data bytes under the window are read.
    """
    with SafetensorsFile(path) as f:
        infos: dict[str, TensorInfo] = f.tensors
        order = reference_order((i.name, i.dtype) for i in infos.values())
        head = header_bytes([(n, infos[n].dtype, infos[n].shape, infos[n].nbytes) for n in order],
                            ss_only(f.metadata), padded=padded, strict=False)
        h = hashlib.sha256()
        lo, hi = LEGACY_OFFSET, LEGACY_OFFSET + LEGACY_LENGTH
        h.update(head[lo:hi])
        pos = len(head)  # stream position of the next tensor's first byte
        for name in order:
            info = infos[name]
            a, b = max(lo, pos), min(hi, pos + info.nbytes)
            if a < b:
                h.update(f.read_bytes(info.begin + a - pos, b - a))
            pos += info.nbytes
            if pos >= hi:
                break
        return h.hexdigest()[:8]


def check_hash(path: str | os.PathLike[str]) -> bool | None:
    """Whether the stored ``sshs_model_hash`` is the SHA-256 of the data region; None when none is stored."""
    with SafetensorsFile(path) as f:
        stored = f.metadata.get("sshs_model_hash")
        if stored is None:
            return None
        h = hashlib.sha256()
        for chunk in _data_chunks(f):
            h.update(chunk)
    return stored.strip().lower().removeprefix("0x") == h.hexdigest()


def hash_report(path: str | os.PathLike[str]) -> dict[str, dict[str, str | bool | None]]:
    """Stored and recomputed ``sshs_*`` values of a file: ``{key: {"stored", "actual", "ok"}}``
    (``ok`` is None when nothing is stored). The legacy hash is recomputed as the reference writer
    lays files out now; a stored value that matches the older unpadded layout also counts as right."""
    with SafetensorsFile(path) as f:
        stored = {k: f.metadata.get(k) for k in ("sshs_model_hash", "sshs_legacy_hash")}
    actual = {"sshs_model_hash": file_model_hash(path), "sshs_legacy_hash": file_legacy_hash(path)}
    report: dict[str, dict[str, str | bool | None]] = {}
    for key, value in stored.items():
        ok = None
        if value is not None:
            value_clean = value.strip().lower().removeprefix("0x")
            ok = value_clean == actual[key]
            if not ok and key == "sshs_legacy_hash":  # taken with an older, unpadded writer?
                ok = value_clean == file_legacy_hash(path, padded=False)
        report[key] = {"stored": value, "actual": actual[key], "ok": ok}
    return report
