"""Deterministic safetensors serialisation: the bytes of a file, written into an open file.

Files are laid out as the reference safetensors writer lays them out (tensors ordered by dtype
then name, header padded with spaces to a multiple of 8), so a file we write is byte-identical
to ``safetensors.torch.save_file`` of the same tensors and metadata. Where the bytes go — a
temporary beside the target, fsynced and renamed, never over an input — is ``io.output``'s job.

``write_safetensors(..., hashes=True)`` sets ``sshs_model_hash``/``sshs_legacy_hash`` itself without a
separate pass over the data: the legacy hash (a 64 KiB window) is taken first, the header is written
with a 64-digit placeholder for the model hash, the data region is SHA-256'd in a worker thread while
the same chunks are written (both release the GIL), and the digest is patched into the header in
place before the fsync and rename. The file is the same bytes as writing ``finalize_metadata``'s
metadata in one go.

One writer departs from that layout on purpose: an extraction's kohya-style file is streamed while its
modules are made (:mod:`loratool.io.stream`), its data in the order the tensors came and its header
padded with spaces into room reserved before the data; it holds the same tensors and metadata, and it
uses this module's header, dtype, finiteness and hash functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from loratool.core.finite import all_finite
from loratool.errors import LoraToolError
from loratool.io.dtypes import names_by_torch

if TYPE_CHECKING:  # torch is imported when a tensor is written (checking a file's hash needs none)
    import torch

# the order of the reference writer's dtype enum; tensors are written largest first
_DTYPE_ORDER = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
    "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
]
_RANK = {name: i for i, name in enumerate(_DTYPE_ORDER)}


def dtype_name(t: torch.Tensor) -> str:
    try:
        return names_by_torch()[t.dtype]
    except KeyError:
        raise LoraToolError(f"tensors of dtype {t.dtype} cannot be stored in safetensors") from None


def reference_order(entries: Iterable[tuple[str, str]]) -> list[str]:
    """Names in the reference writer's data order, from ``(name, dtype name)`` pairs: widest dtype
    enum first, then name."""
    return [n for n, _ in sorted(entries, key=lambda e: (-_RANK[e[1]], e[0]))]


def ordered_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The order the data region holds the tensors in: dtype (widest enum first), then name."""
    return reference_order((k, dtype_name(t)) for k, t in tensors.items())


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a tensor (a contiguous CPU copy when needed)."""
    import torch

    if t.layout != torch.strided:
        raise LoraToolError(f"a {t.layout} tensor cannot be stored in safetensors (make it dense first)")
    if t.device.type == "meta":
        raise LoraToolError("a tensor on the meta device has no data to write")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


FREE_TEXT_KEYS = frozenset({"modelspec.title", "modelspec.description", "modelspec.author", "modelspec.tags",
                            "modelspec.license", "modelspec.usage_hint", "ss_output_name", "ss_training_comment",
                            "loratool.token"})  # names and prose: "inf" there is a word, not a number
_NON_FINITE_WORDS = frozenset({"nan", "-nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"})


def _bad_number(text: str) -> str | None:
    """What is wrong with a metadata value that holds a number, or None: a non-finite number written
    as one (``nan``, ``inf``, ``1e400``), or inside a JSON value (``NaN``, ``Infinity``, ``1e999``)."""
    stripped = text.strip()
    if stripped.lower() in _NON_FINITE_WORDS:
        return f"it is a non-finite number ({stripped})"
    if stripped[:1].isdigit() or stripped[:1] in "+-.":
        try:
            if not math.isfinite(float(stripped)):
                return f"it is a number out of range ({stripped[:40]})"
        except ValueError:
            return None
        return None
    if stripped[:1] in "{[" and any(w in stripped for w in ("NaN", "Infinity", "e", "E")):
        from loratool.io.jsontext import NonFinite, parse_json

        try:
            parse_json(stripped)
        except NonFinite as e:
            return str(e)
        except ValueError:
            return None
    return None


def _utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LoraToolError(f"{what} is not valid text (it holds a lone UTF-16 surrogate)") from None


def check_metadata(metadata: Mapping[str, str] | None, *, strict: bool = True) -> dict[str, str] | None:
    """Metadata as the file will hold it (sorted by key); every key and value must be a string.

    ``None`` means no ``__metadata__`` entry at all; ``{}`` an empty one (as the reference writer does).
    ``strict`` (every write): a value that is a non-finite number, or a JSON value holding one, is
    refused, and so is text that UTF-8 cannot encode (lone surrogates), naming the key.
    """
    if metadata is None:
        return None
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LoraToolError(f"metadata {k!r} must map a string to a string, not {type(v).__name__}")
        if strict:
            _utf8(k, f"the metadata key {k!r}")
            _utf8(v, f"the metadata value of {k!r}")
            bad = None if k in FREE_TEXT_KEYS else _bad_number(v)
            if bad:
                raise LoraToolError(f"the metadata value of {k!r} cannot be written: {bad}")
    return dict(sorted(metadata.items()))


def check_finite(name: str, t: torch.Tensor) -> None:
    """Refuse a floating-point tensor holding NaN or ±inf, naming it (every tensor the tool writes)."""
    import torch

    if t.layout != torch.strided or t.device.type == "meta" or all_finite(t):
        return  # finite (or nothing to check: tensor_bytes refuses it)
    wide = t.detach().float() if t.element_size() == 1 else t.detach()
    bad = "NaN" if bool(torch.isnan(wide).any()) else "infinite values"
    raise LoraToolError(f"tensor {name!r} holds {bad}: refusing to write a non-finite result "
                        "(an input holds it, or the operation overflowed)")


def header_bytes(entries: Iterable[tuple[str, str, Sequence[int], int]],
                 metadata: Mapping[str, str] | None, *, padded: bool = True, strict: bool = True,
                 pad_to: int | None = None) -> bytes | None:
    """The 8-byte length plus the space-padded JSON header for ``(name, dtype, shape, nbytes)``
    entries given in data order. ``padded=False`` gives the unpadded header of older writers
    (safetensors before 0.3), only for recomputing hashes that were taken with them; ``strict=False``
    (the same) skips the checks every write gets (:func:`check_metadata`, names that are text).
    ``pad_to``: the JSON padded with spaces to exactly that many bytes (None when it is longer)."""
    header: dict[str, object] = {}
    meta = check_metadata(metadata, strict=strict)
    if meta is not None:
        header["__metadata__"] = meta
    offset = 0
    for name, dtype, shape, n in entries:
        if strict:
            _utf8(name, f"the tensor name {name!r}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if pad_to is not None:
        if len(raw) > pad_to:
            return None
        raw += b" " * (pad_to - len(raw))
    elif padded:
        raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw



def build_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The 8-byte length plus the padded JSON header, and the tensor order."""
    for name in tensors:
        if not isinstance(name, str) or name == "__metadata__":
            raise LoraToolError(f"{name!r} cannot name a tensor in a safetensors file")
    names = ordered_names(tensors)
    entries = []
    for name in names:
        t = tensors[name]
        entries.append((name, dtype_name(t), tuple(t.shape), t.numel() * t.element_size()))
    return header_bytes(entries, metadata), names


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A whole file in memory (small adapters, hashing)."""
    head, names = build_header(tensors, metadata)
    return head + b"".join(bytes(tensor_bytes(tensors[n])) for n in names)


HASH_KEY = "sshs_model_hash"
_PLACEHOLDER = "0" * 64  # a SHA-256 hex digest is always 64 characters: the header length is fixed
HASH_CHUNK = 1 << 24  # bytes per write/hash step


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None, *, force: bool = False,
                      inputs: Iterable[str | os.PathLike[str]] = (), hashes: bool = False) -> Path:
    """One file written through the one writer (``io.output``: atomic, never over an input, an existing
    file only with ``force``) — for library callers and tests that write a single file.

    ``hashes=True``: any ``sshs_*`` values in ``metadata`` are replaced by the right ones, computed
    while writing (the same file as ``finalize_metadata(tensors, metadata)`` would give)."""
    from loratool.io.output import Outputs

    return Outputs(inputs, force=force).write_safetensors(path, tensors, metadata, hashes=hashes)


def write_file(fh: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
               *, hashes: bool = False) -> None:
    """Serialise into ``fh``, an open binary file at offset 0 (tensors sharing storage are each written in
    full). ``hashes=True``: see :func:`write_safetensors`."""
    if hashes:
        _write_hashed(fh, tensors, metadata)
        return
    head, names = build_header(tensors, metadata)
    fh.write(head)
    for name in names:
        check_finite(name, tensors[name])
        fh.write(tensor_bytes(tensors[name]))


def _hash_slot(head: bytes) -> int:
    """Where the placeholder digest starts in a header (the key's only unescaped occurrence)."""
    needle = json.dumps({HASH_KEY: _PLACEHOLDER}, separators=(",", ":"))[1:-1].encode()
    at = head.find(needle)
    if at < 0 or head.find(needle, at + 1) >= 0:  # pragma: no cover - keys are unique, values escaped
        raise LoraToolError("cannot place sshs_model_hash in the header")
    return at + len(needle) - len(_PLACEHOLDER) - 1  # the needle ends with the closing quote


def _chunks(tensors: Mapping[str, torch.Tensor], names: list[str]):
    for name in names:
        check_finite(name, tensors[name])
        data = tensor_bytes(tensors[name])
        for lo in range(0, len(data), HASH_CHUNK):
            yield data[lo:lo + HASH_CHUNK]


WRITEBACK_BYTES = 32 << 20  # how much is written before its write-back to disk is started


def writeback_starter():
    """Linux ``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)``: start writing a range to disk
    without waiting, so that the final fsync finds little left to do (None where unavailable)."""
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, n: call(fd, offset, n, 2)  # errors ignored: the fsync still follows


def _write_hashed(fh: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    from loratool.io.hashes import legacy_hash  # hashes builds on this module

    meta = {k: v for k, v in (check_metadata(metadata) or {}).items() if not k.startswith("sshs_")}
    meta["sshs_legacy_hash"] = legacy_hash(tensors, meta)  # 64 KiB window: cheap, and known before writing
    meta[HASH_KEY] = _PLACEHOLDER
    head, names = build_header(tensors, meta)
    slot = _hash_slot(head)
    digest = hashlib.sha256()
    writeback = writeback_starter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        fh.write(head)
        pos = started = len(head)
        hashed = None
        for chunk in _chunks(tensors, names):  # the next chunk's finiteness check overlaps the last one's hash
            if hashed is not None:
                hashed.result()  # the digest takes chunks in order: one in flight
            hashed = pool.submit(digest.update, chunk)  # overlaps with the write of the same chunk
            fh.write(chunk)
            pos += len(chunk)
            if writeback is not None and pos - started >= WRITEBACK_BYTES:  # not per tensor: thousands of
                fh.flush()  # small tensors made as many flushes and calls
                writeback(fh.fileno(), started, pos - started)
                started = pos
        if hashed is not None:
            hashed.result()
        fh.flush()  # before the seek, which would flush the buffer itself, without the output's name on an error
        fh.seek(slot)
        fh.write(digest.hexdigest().encode("ascii"))
