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


def parse_header(raw: bytes, path: str, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Validate a header (the bytes after the 8-byte length) against the file size.

    Returns (tensors in file order, metadata, data_start).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "not a safetensors file: the header is not UTF-8 text") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise _fail(path, "not a safetensors file: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file: the header is not a JSON object")

    metadata: dict[str, str] = {}
    raw_meta = header.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            raise _fail(path, "invalid safetensors header: __metadata__ is not an object")
        for k, v in raw_meta.items():
            if not isinstance(v, str):
                raise _fail(path, f"invalid safetensors header: metadata value of {k!r} is not a string")
        metadata = dict(raw_meta)

    infos = [_tensor_info(path, name, entry) for name, entry in header.items()]
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    expected = 0
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin != expected:
            what = "overlap" if info.begin < expected else "leave a gap"
            raise _fail(path, f"invalid safetensors header: offsets of tensor {info.name!r} {what} "
                              f"(begins at {info.begin}, expected {expected})")
        expected = info.end
    if expected > data_size:
        raise _fail(path, f"truncated: {max(data_size, 0)} of {expected} data bytes present")
    if expected < data_size:
        raise _fail(path, f"invalid safetensors file: {data_size - expected} unexpected bytes after the tensor data")
    return {i.name: i for i in infos}, metadata, data_start


def _tensor_info(path: str, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"invalid safetensors header: entry {name!r} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"invalid safetensors header: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(s) is int and 0 <= s < 2**48 for s in shape):
        raise _fail(path, f"invalid safetensors header: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o < 2**63 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise _fail(path, f"invalid safetensors header: tensor {name!r} has invalid data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    bits = DTYPES[dtype][1]
    if info.numel * bits != info.nbytes * 8:
        raise _fail(path, f"invalid safetensors header: tensor {name!r} of shape {list(shape)} and dtype "
                          f"{dtype} needs {info.numel * bits // 8} bytes but its offsets span {info.nbytes}")
    return info


class SafetensorsFile:
    """An open safetensors file. Use as a context manager or call :meth:`close`."""

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
        self._mmap: mmap.mmap | None = None

    def _read_header(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        self.file_size = size
        if size < 8:
            raise _fail(self.path, f"not a safetensors file: too small ({size} bytes)")
        n = int.from_bytes(self._fh.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise _fail(self.path, f"not a safetensors file: header length {n} is over the 100 MB limit")
        if n < 2 or 8 + n > size:
            raise _fail(self.path, f"not a safetensors file: header length {n} does not fit the file ({size} bytes)")
        raw = self._fh.read(n)
        self.header_bytes = n
        self.tensors, self.metadata, self.data_start = parse_header(raw, self.path, size)

    # -- mapping-like access -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def get(self, key: str) -> torch.Tensor:
        """One tensor, backed by the memory map (read-only view; copy before writing to it)."""
        info = self.tensors[key]
        torch_dtype = DTYPES[info.dtype][0]
        if torch_dtype is None:
            raise _fail(self.path, f"tensor {key!r} has dtype {info.dtype}, which this torch cannot hold")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype)
        buf = self._map()
        start = self.data_start + info.begin
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=info.nbytes, offset=start)
        return flat.view(torch_dtype).reshape(info.shape)

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def raw_data(self) -> memoryview:
        """The data region (for hashing)."""
        return memoryview(self._map())[self.data_start:]

    def close(self) -> None:
        # tensors handed out keep views into the map; let the GC close it when they are gone
        self._mmap = None
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    with SafetensorsFile(path) as f:
        return dict(f.metadata)


def load_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a file, copied into memory (small files and tests)."""
    with SafetensorsFile(path) as f:
        return {k: f.get(k).clone() for k in f.keys()}


def is_safetensors_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in (".safetensors", ".sft")
