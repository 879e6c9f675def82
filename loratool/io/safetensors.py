"""A strict safetensors reader that needs no torch for headers and no memory map for tensors.

The header is parsed and validated without touching tensor data and without importing torch
(dtype names stay strings; :mod:`loratool.io.dtypes` resolves them when a tensor is built). Tensors
are read with positional reads (``os.preadv``) into a fresh buffer or into one the caller gives
(a pinned staging buffer on CUDA), whole or a range of rows: nothing of the file is memory-mapped
into the process, so reading a multi-gigabyte checkpoint costs only the buffers in use. Every
defect raises :class:`SafetensorsError` with one line that names the file and says what is wrong
(reference/webui.md §8 lists the rules).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import SafetensorsError
from loratool.io.dtypes import BITS, names_by_torch, torch_dtype, torch_dtypes

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000
Rows = tuple[int, int]


def __getattr__(name: str) -> Any:
    """``DTYPES`` (name -> (torch dtype or None, bits)) and ``TORCH_TO_NAME``, built on first use so
    that importing this module does not import torch."""
    if name == "DTYPES":
        return {n: (t, BITS[n]) for n, t in torch_dtypes().items()}
    if name == "TORCH_TO_NAME":
        return names_by_torch()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    Tensors come from positional reads into their own memory (or a buffer the caller passes), so
    they stay valid after :meth:`close`, writing to them never changes the file, and several
    threads may read one file at once (no shared file position).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
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

    def fileno(self) -> int:
        """The open file's descriptor (for byte-range copies of untouched tensors)."""
        self._check_open("use the file")
        return self._fh.fileno()

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
        found = torch_dtype(info.dtype)
        if found is None:
            raise _fail(self.path, f"tensor {key!r} has dtype {info.dtype}, which this torch cannot hold")
        return found

    # -- positional reads -----------------------------------------------------------------
    def nbytes(self, key: str, rows: Rows | None = None) -> int:
        """Bytes :meth:`read` needs for ``key`` (rows ``[start, stop)`` of it, or all)."""
        return self._rows(key, rows)[1]

    def read(self, key: str, rows: Rows | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor (or rows ``[start, stop)`` of its first dim) in its stored dtype.

        Read with positional reads into ``out`` (a contiguous CPU ``uint8`` tensor of at least
        :meth:`nbytes` bytes, e.g. a pinned staging buffer; the result is a view of it) or into a new
        buffer. Nothing is memory-mapped.
        """
        import torch

        dtype = self.dtype(key)
        begin, n, shape = self._rows(key, rows)
        self._check_open(f"read tensor {key!r}")
        if out is None:
            out = torch.empty(n, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < n:
            raise ValueError(f"a read of {key!r} needs a contiguous CPU uint8 buffer of {n} bytes")
        buf = out[:n]
        if n:
            self._pread(self.data_start + begin, memoryview(buf.numpy()).cast("B"), key)
        return buf.view(dtype).reshape(shape)

    def get(self, key: str) -> torch.Tensor:
        """One whole tensor in new memory (a positional read; the file never changes)."""
        return self.read(key)

    def read_bytes(self, begin: int, length: int) -> bytes:
        """``length`` bytes at ``begin`` of the data region (for hashing windows of a file)."""
        self._check_open("read")
        buf = bytearray(max(0, length))
        self._pread(self.data_start + begin, memoryview(buf), "data")
        return bytes(buf)

    def raw_data(self) -> memoryview:
        """The whole data region (small files; large files: :meth:`read_bytes` in chunks)."""
        return memoryview(self.read_bytes(0, self.file_size - self.data_start))

    def _rows(self, key: str, rows: Rows | None) -> tuple[int, int, tuple[int, ...]]:
        try:
            return self.info(key).rows(rows)
        except IndexError as e:
            raise _fail(self.path, f"cannot read {e}") from None

    def _check_open(self, what: str) -> None:
        if self._fh.closed:
            raise _fail(self.path, f"cannot {what}: the file was closed")

    def _pread(self, offset: int, view: memoryview, what: str) -> None:
        fd = self._fh.fileno()
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise _fail(self.path, f"cannot read: {e.strerror}") from None
        if size != self.file_size:
            raise _fail(self.path, f"the file changed size while open ({self.file_size} -> {size} bytes)")
        done = 0
        while done < len(view):
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise _fail(self.path, f"cannot read {what}: {e.strerror}") from None
            if got <= 0:
                raise _fail(self.path, f"{what} is cut short: the file ended at byte {offset + done}")
            done += got

    def close(self) -> None:
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
    """Every tensor of a file, read into memory (small files and tests)."""
    with SafetensorsFile(path) as f:
        return {k: f.get(k) for k in f.keys()}


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
