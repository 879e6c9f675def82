"""A strict, lazy safetensors reader.

The header is parsed and validated without touching tensor data; tensors are read one at a time
from a memory map. Every defect raises :class:`SafetensorsError` with one line that names the
file and says what is wrong (reference/webui.md §8 lists the rules).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.errors import SafetensorsError

MAX_HEADER_BYTES = 100_000_000

# safetensors dtype name -> (torch dtype or None when this torch lacks it, bits per element)
DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8),
    "U8": (torch.uint8, 8),
    "I8": (torch.int8, 8),
    "I16": (torch.int16, 16),
    "U16": (getattr(torch, "uint16", None), 16),
    "I32": (torch.int32, 32),
    "U32": (getattr(torch, "uint32", None), 32),
    "I64": (torch.int64, 64),
    "U64": (getattr(torch, "uint64", None), 64),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "F32": (torch.float32, 32),
    "F64": (torch.float64, 64),
    "C64": (torch.complex64, 64),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
}

TORCH_TO_NAME: dict[torch.dtype, str] = {t: name for name, (t, _) in DTYPES.items() if t is not None}


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


def _fail(path: str, message: str) -> SafetensorsError:
    return SafetensorsError(message, path)


class MissingTensor(SafetensorsError, KeyError):
    """A tensor name the file does not hold (also a KeyError, for mapping-style callers)."""

    def __str__(self) -> str:
        return self.one_line()


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
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
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as d:
        raise _fail(path, f"invalid safetensors header: the name {d.key!r} appears twice") from None
    except (ValueError, RecursionError):
        raise _fail(path, "not a safetensors file: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _fail(path, f"not a safetensors file: the header is JSON but not an object "
                          f"(a {type(header).__name__})")
    return header


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


def parse_header(raw: bytes, path: str, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Validate a header (the bytes after the 8-byte length) against the file size.

    Returns (tensors in file order, metadata, data_start).
    """
    tensors, metadata, data_start, _ = _parse(raw, path, file_size)
    return tensors, metadata, data_start


def _parse(raw: bytes, path: str, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int, bool]:
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
    if not isinstance(dtype, str) or dtype not in DTYPES:
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
    bits = DTYPES[dtype][1]
    if info.numel * bits != info.nbytes * 8:
        raise _fail(path, f"invalid safetensors header: tensor {name!r} of shape {list(shape)} and dtype "
                          f"{dtype} needs {info.numel * bits // 8} bytes but its offsets span {info.nbytes}")
    return info


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sniff(first: bytes) -> str:
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


class SafetensorsFile:
    """An open safetensors file. Use as a context manager or call :meth:`close`.

    Tensors from :meth:`get` are views of a private (copy-on-write) memory map of the file: writing
    to them never changes the file, and they stay valid after :meth:`close` (the map is released
    when the last of them is gone).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._mmap: mmap.mmap | None = None
        try:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            raise _fail(self.path, "no such file") from None
        except IsADirectoryError:
            raise _fail(self.path, "is a folder, not a safetensors file") from None
        except OSError as e:
            raise _fail(self.path, f"cannot open: {e.strerror}") from None
        try:
            self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def _read_header(self) -> None:
        try:
            size = os.fstat(self._fh.fileno()).st_size
            self.file_size = size
            first = self._fh.read(8)
        except OSError as e:
            raise _fail(self.path, f"cannot read: {e.strerror}") from None
        if size < 8 or len(first) < 8:
            raise _fail(self.path, f"not a safetensors file{_sniff(first)}: too small ({size} bytes)")
        n = int.from_bytes(first, "little")
        if n > MAX_HEADER_BYTES:
            raise _fail(self.path, f"not a safetensors file{_sniff(first)}: header length {n} is over "
                                   f"the 100 MB limit")
        if 8 + n > size:
            raise _fail(self.path, f"not a safetensors file{_sniff(first)}: header length {n} is beyond the "
                                   f"end of the file ({size} bytes)")
        if n < 2:
            raise _fail(self.path, f"not a safetensors file: header length {n} is too short for a JSON object")
        raw = self._fh.read(n)
        if len(raw) != n:
            raise _fail(self.path, f"truncated: {len(raw)} of {n} header bytes present")
        self.header_bytes = n
        # metadata_present: the header has a __metadata__ entry (possibly empty), for exact rewrites
        self.tensors, self.metadata, self.data_start, self.metadata_present = _parse(raw, self.path, size)

    # -- mapping-like access -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise MissingTensor(f"no tensor named {key!r}", self.path) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """The torch dtype of a tensor (an error when this torch cannot hold it)."""
        info = self.info(key)
        torch_dtype = DTYPES[info.dtype][0]
        if torch_dtype is None:
            raise _fail(self.path, f"tensor {key!r} has dtype {info.dtype}, which this torch cannot hold")
        return torch_dtype

    def get(self, key: str) -> torch.Tensor:
        """One tensor, backed by the private memory map (copy-on-write; the file never changes)."""
        info = self.info(key)
        torch_dtype = self.dtype(key)
        if self.closed:
            raise _fail(self.path, f"cannot read tensor {key!r}: the file was closed")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype)
        buf = self._map()
        start = self.data_start + info.begin
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=info.nbytes, offset=start)
        return flat.view(torch_dtype).reshape(info.shape)

    def _map(self) -> mmap.mmap:
        if self._fh.closed:
            raise _fail(self.path, "the file was closed")
        try:
            size = os.fstat(self._fh.fileno()).st_size
        except OSError as e:
            raise _fail(self.path, f"cannot read: {e.strerror}") from None
        if size != self.file_size:  # changed under us: mapping it could crash on access
            raise _fail(self.path, f"the file changed size while open ({self.file_size} -> {size} bytes)")
        if self._mmap is None:
            try:
                self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise _fail(self.path, f"cannot memory-map the file: {e}") from None
        return self._mmap

    def raw_data(self) -> memoryview:
        """The data region (for hashing small files; large files: stream it, see io.hashes)."""
        return memoryview(self._map())[self.data_start:]

    def close(self) -> None:
        """Close the file. The map itself is never closed here: tensors handed out hold a reference
        to it (unmapping under them would crash), so it goes when the last of them does."""
        self._mmap = None
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    with SafetensorsFile(path) as f:
        return dict(f.metadata)


def load_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a file, copied into memory (small files and tests)."""
    with SafetensorsFile(path) as f:
        return {k: f.get(k).clone() for k in f.keys()}


def is_safetensors_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in (".safetensors", ".sft")


def looks_like_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether a file begins like a safetensors file (a plausible header length, then ``{``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= min(size - 8, MAX_HEADER_BYTES) and head[8:9] == b"{"
