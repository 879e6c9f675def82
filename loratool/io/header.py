"""Parsing and validating a safetensors header: no tensor data is touched and torch is not needed.

The rules (reference/webui.md §8): the header is a UTF-8 JSON object without duplicate names;
``__metadata__`` maps strings to strings; every entry has a known dtype, a shape of non-negative
integers and in-order offsets whose span matches shape × dtype; sorted by offsets, the tensors tile
the data region exactly (no overlap, no gap, nothing past the end, nothing after the last one).
Every defect is a :class:`SafetensorsError` of one line naming the file.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from loratool.errors import SafetensorsError
from loratool.io.dtypes import BITS
from loratool.io.jsontext import JsonLimit, NonFinite, parse_json

MAX_HEADER_BYTES = 100_000_000
HEADER_DEPTH = 4  # header -> entry -> shape list (a value nested deeper is wrong anyway)
Rows = tuple[int, int]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def rows(self, rows: Rows | None) -> tuple[int, int, tuple[int, ...]]:
        """(begin, byte count, shape) of rows ``[start, stop)`` along the first dim (all: None)."""
        if rows is None:
            return self.begin, self.nbytes, self.shape
        start, stop = rows
        count = self.shape[0] if self.shape else 0
        if not self.shape or not 0 <= start <= stop <= count:
            raise IndexError(f"rows {start}:{stop} of tensor {self.name!r} of shape {list(self.shape)}")
        row_bytes = self.nbytes // count if count else 0
        return self.begin + start * row_bytes, (stop - start) * row_bytes, (stop - start, *self.shape[1:])


def _fail(path: str, message: str) -> SafetensorsError:
    return SafetensorsError(message, path)


class MissingTensor(SafetensorsError, KeyError):
    """A tensor name the file does not hold (also a KeyError, for mapping-style callers)."""

    def __str__(self) -> str:
        return self.one_line()


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) < len(pairs):  # only then look for the name that came twice
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return out


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _decode_json(raw: bytes, path: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "not a safetensors file: the header is not UTF-8 text") from None
    try:
        header = parse_json(text, max_depth=HEADER_DEPTH, object_pairs_hook=_no_duplicates)
    except _Duplicate as d:
        raise _fail(path, f"invalid safetensors header: the name {d.key!r} appears twice") from None
    except JsonLimit as e:
        raise _fail(path, f"not a safetensors file: the header is not valid JSON ({e})") from None
    except NonFinite as e:
        raise _fail(path, f"invalid safetensors header: {e}") from None
    except (ValueError, RecursionError):
        raise _fail(path, "not a safetensors file: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _fail(path, f"not a safetensors file: the header is JSON but not an object "
                          f"(a {type(header).__name__})")
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(header, path)
    return header


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # an escaped UTF-16 surrogate: maybe a lone one


def _refuse_lone_surrogates(header: dict, path: str) -> None:
    """Names and metadata must be text (what the reference reader and every writer require): a lone
    UTF-16 surrogate escaped in the JSON cannot be written back, nor printed."""
    meta = header.get("__metadata__")
    texts = [("tensor name", k) for k in header]
    if isinstance(meta, dict):
        texts += [("metadata key", k) for k in meta] + [(f"metadata value of {k!r}", v) for k, v in meta.items()]
    for what, text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _fail(path, f"invalid safetensors header: the {what} {text!r} holds a lone UTF-16 "
                                  "surrogate (not valid Unicode text)") from None


def _parse_metadata(raw_meta: object, path: str) -> dict[str, str]:
    if raw_meta is None:
        return {}
    if not isinstance(raw_meta, dict):
        raise _fail(path, "invalid safetensors header: __metadata__ is not an object")
    for k, v in raw_meta.items():
        if not isinstance(v, str):
            raise _fail(path, f"invalid safetensors header: metadata value of {k!r} is a "
                              f"{_json_type(v)}, not a string")
    return dict(raw_meta)


def _json_type(v: object) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "list", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


_PARSED: OrderedDict[tuple[bytes, int], tuple] = OrderedDict()
_PARSED_LOCK = threading.Lock()
_PARSED_COUNT = 4  # a base and a tuned model, each as one file or a few components
_PARSED_MAX_BYTES = 8 << 20  # larger headers (an LLM's many shards are each small) are parsed again


def parse_header(raw: bytes, path: str, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int, bool]:
    """Validate a header (the bytes after the 8-byte length) against the file size.

    Returns (tensors in file order, metadata, data_start, whether ``__metadata__`` is present). The last
    few headers that passed are remembered by their bytes and the file size (an extraction opens both
    models to plan and again to read: SDXL's two headers cost ~50 ms to parse); a caller gets its own dicts.
    """
    key = (raw, file_size)
    with _PARSED_LOCK:
        hit = _PARSED.get(key)
        if hit is not None:
            _PARSED.move_to_end(key)
    if hit is None:
        hit = _parse_header(raw, path, file_size)
        if len(raw) <= _PARSED_MAX_BYTES:
            with _PARSED_LOCK:
                _PARSED[key] = hit
                while len(_PARSED) > _PARSED_COUNT:
                    _PARSED.popitem(last=False)
    tensors, metadata, data_start, present = hit
    return dict(tensors), dict(metadata), data_start, present


def _parse_header(raw: bytes, path: str, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int, bool]:
    header = _decode_json(raw, path)
    present = "__metadata__" in header
    metadata = _parse_metadata(header.pop("__metadata__", None), path)
    infos = [_tensor_info(path, name, entry) for name, entry in header.items()]
    data_start = 8 + len(raw)
    _check_layout(path, infos, file_size - data_start)
    return {i.name: i for i in infos}, metadata, data_start, present


def _check_layout(path: str, infos: list[TensorInfo], data_size: int) -> None:
    """Tensors, sorted by offsets, must tile the data region exactly: no overlap, no gap, nothing
    past the end of the file and nothing after the last tensor."""
    expected = 0
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin < expected:
            raise _fail(path, f"invalid safetensors header: tensor {info.name!r} overlaps the tensor before it "
                              f"(its data begins at {info.begin}, the previous one ends at {expected})")
        if info.begin > expected:
            raise _fail(path, f"invalid safetensors header: a gap of {info.begin - expected} bytes before "
                              f"tensor {info.name!r} (data begins at {info.begin}, expected {expected})")
        expected = info.end
    if expected > data_size:
        raise _fail(path, f"truncated: {max(data_size, 0)} of {expected} bytes of tensor data present "
                          f"(the file is incomplete)")
    if expected < data_size:
        raise _fail(path, f"invalid safetensors file: {data_size - expected} unexpected bytes after the tensor data")


def _tensor_info(path: str, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"invalid safetensors header: entry {name!r} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in BITS:
        raise _fail(path, f"invalid safetensors header: tensor {name!r} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(type(s) is int and 0 <= s < 2**48 for s in shape):
        raise _fail(path, f"invalid safetensors header: tensor {name!r} has an invalid shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o < 2**48 for o in offsets)
    ):
        raise _fail(path, f"invalid safetensors header: tensor {name!r} has invalid data_offsets {_short(offsets)}")
    if offsets[1] < offsets[0]:
        raise _fail(path, f"invalid safetensors header: tensor {name!r} has data_offsets out of order "
                          f"(ends at {offsets[1]} before it begins at {offsets[0]})")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    bits = BITS[dtype]
    if info.numel * bits != info.nbytes * 8:
        raise _fail(path, f"invalid safetensors header: tensor {name!r} of shape {list(shape)} and dtype "
                          f"{dtype} needs {info.numel * bits // 8} bytes but its offsets span {info.nbytes}")
    return info


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sniff(first: bytes) -> str:
    """What a file that is not safetensors looks like, from its first bytes."""
    if first.startswith(b"PK\x03\x04"):
        return " (it is a zip archive, like a torch .pt/.bin/.ckpt pickle)"
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return " (it is a Python pickle)"
    stripped = first.lstrip()
    if stripped[:1] in (b"{", b"["):
        return " (it is a JSON text file)"
    if first and all(32 <= c < 127 or c in (9, 10, 13) for c in first):
        return " (it is a text file)"
    return ""
