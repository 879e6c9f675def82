"""A strict safetensors reader: headers without torch; tensors by positional reads (big models) or as
views of a private memory map (adapters).

The header is parsed and validated without touching tensor data and without importing torch
(dtype names stay strings; :mod:`loratool.io.dtypes` resolves them when a tensor is built).

Two ways to read a tensor, for two kinds of input:

* :meth:`SafetensorsFile.read` — positional reads (``os.preadv``), whole or a range of rows, into a
  fresh buffer or one the caller gives (a reused, pinned staging buffer on CUDA). Nothing is
  memory-mapped, so streaming a multi-gigabyte checkpoint costs only the buffers in use: what
  extract and merge do.
* :meth:`SafetensorsFile.get` — a view of a private (copy-on-write) memory map: no copy at all, which
  is what an adapter read whole and written out again wants (bench/reader.py measures both).

Every defect raises :class:`SafetensorsError` with one line that names the file and says what is
wrong (reference/webui.md §8 lists the rules).
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoraToolError, SafetensorsError
from loratool.io.dtypes import BITS, names_by_torch, torch_dtype, torch_dtypes
from loratool.io.header import MAX_HEADER_BYTES, MissingTensor, Rows, TensorInfo, parse_header, sniff
from loratool.io.mapped import note_mapped, note_unmapped
from loratool.io.regular import open_regular

__all__ = ["MAX_HEADER_BYTES", "MissingTensor", "SafetensorsFile", "TensorInfo", "is_safetensors_path", "load_file",
           "looks_like_safetensors", "read_metadata"]

if TYPE_CHECKING:
    import torch


def __getattr__(name: str) -> Any:
    """``DTYPES`` (name -> (torch dtype or None, bits)) and ``TORCH_TO_NAME``, built on first use so
    that importing this module does not import torch."""
    if name == "DTYPES":
        return {n: (t, BITS[n]) for n, t in torch_dtypes().items()}
    if name == "TORCH_TO_NAME":
        return names_by_torch()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SafetensorsFile:
    """An open safetensors file. Use as a context manager or call :meth:`close`.

    Tensors stay valid after :meth:`close` and writing to them never changes the file; several
    threads may read one file at once (positional reads share no file position).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._mmap: mmap.mmap | None = None
        try:
            self._fh = open_regular(self.path)  # never blocks on a FIFO; refuses devices and sockets
        except FileNotFoundError:
            raise SafetensorsError("no such file", self.path) from None
        except IsADirectoryError:
            raise SafetensorsError("is a folder, not a safetensors file", self.path) from None
        except LoraToolError as e:
            raise SafetensorsError(e.message, self.path) from None
        except OSError as e:
            raise SafetensorsError(f"cannot open: {e.strerror}", self.path) from None
        try:
            self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def _read_header(self) -> None:
        try:
            st = os.fstat(self._fh.fileno())
            size = st.st_size
            self.file_size = size
            self._identity = _identity(st)
            first = self._fh.read(8)
        except OSError as e:
            raise SafetensorsError(f"cannot read: {e.strerror}", self.path) from None
        if size < 8 or len(first) < 8:
            raise SafetensorsError(f"not a safetensors file{sniff(first)}: too small ({size} bytes)", self.path)
        n = int.from_bytes(first, "little")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"not a safetensors file{sniff(first)}: header length {n} is over "
                                   f"the 100 MB limit", self.path)
        if 8 + n > size:
            raise SafetensorsError(f"not a safetensors file{sniff(first)}: header length {n} is beyond the "
                                   f"end of the file ({size} bytes)", self.path)
        if n < 2:
            raise SafetensorsError(f"not a safetensors file: header length {n} is too short for a JSON object", self.path)
        raw = self._fh.read(n)
        if len(raw) != n:
            raise SafetensorsError(f"truncated: {len(raw)} of {n} header bytes present", self.path)
        self.header_bytes = n
        # metadata_present: the header has a __metadata__ entry (possibly empty), for exact rewrites
        self.tensors, self.metadata, self.data_start, self.metadata_present = parse_header(raw, self.path, size)

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
            raise SafetensorsError(f"tensor {key!r} has dtype {info.dtype}, which this torch cannot hold", self.path)
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
        """One whole tensor, a view of the private memory map (copy-on-write: the file never changes;
        the map lives as long as the last view of it)."""
        import torch

        info = self.info(key)
        dtype = self.dtype(key)
        self._check_open(f"read tensor {key!r}")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.frombuffer(self._map(), dtype=torch.uint8, count=info.nbytes, offset=self.data_start + info.begin)
        return flat.view(dtype).reshape(info.shape)

    def _map(self) -> mmap.mmap:
        self._check_size(self._fh.fileno())  # changed under us: touching the map could crash
        if self._mmap is None:
            try:
                self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise SafetensorsError(f"cannot memory-map the file: {e}", self.path) from None
            note_mapped(self.path)
            weakref.finalize(self._mmap, note_unmapped, self.path)
        return self._mmap

    def read_bytes(self, begin: int, length: int) -> bytes:
        """``length`` bytes at ``begin`` of the data region (hashing a file in chunks)."""
        self._check_open("read")
        fd = self._fh.fileno()
        self._check_size(fd)
        try:
            data = os.pread(fd, length, self.data_start + begin)
        except OSError as e:
            raise SafetensorsError(f"cannot read: {e.strerror}", self.path) from None
        if len(data) != length:
            raise SafetensorsError(f"the data is cut short: the file ended at byte {self.data_start + begin + len(data)}", self.path)
        self._check_size(fd)  # changed while it was read: the bytes may be a mix of old and new
        return data

    def extent(self, key: str, rows: Rows | None = None) -> tuple[int, int]:
        """(offset in the file, length) of the bytes a :meth:`read` of ``key`` (rows ``[start, stop)`` of
        it, or all) reads: what the OS can be told to fetch ahead (``posix_fadvise``)."""
        begin, n, _ = self._rows(key, rows)
        return self.data_start + begin, n

    def raw_data(self) -> memoryview:
        """The whole data region (small files; large files: :meth:`read_bytes` in chunks)."""
        return memoryview(self.read_bytes(0, self.file_size - self.data_start))

    def _rows(self, key: str, rows: Rows | None) -> tuple[int, int, tuple[int, ...]]:
        try:
            return self.info(key).rows(rows)
        except IndexError as e:
            raise SafetensorsError(f"cannot read {e}", self.path) from None

    def _check_open(self, what: str) -> None:
        if self._fh.closed:
            raise SafetensorsError(f"cannot {what}: the file was closed", self.path)

    def _check_size(self, fd: int) -> None:
        """Refuse a file that changed since it was opened: its size (the map would fault past the new
        end) or its modification time (another program wrote into it)."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise SafetensorsError(f"cannot read: {e.strerror}", self.path) from None
        if st.st_size != self.file_size:
            raise SafetensorsError(f"the file changed size while open ({self.file_size} -> {st.st_size} bytes)",
                                   self.path)
        if _identity(st) != self._identity:
            raise SafetensorsError("the file was changed by another program while it was read", self.path)

    def _pread(self, offset: int, view: memoryview, what: str) -> None:
        fd = self._fh.fileno()
        self._check_size(fd)
        done = 0
        while done < len(view):
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise SafetensorsError(f"cannot read {what}: {e.strerror}", self.path) from None
            if got <= 0:
                raise SafetensorsError(f"{what} is cut short: the file ended at byte {offset + done}", self.path)
            done += got
        self._check_size(fd)  # changed during the read: the bytes may be a mix of old and new

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


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is written to: its size, modification time, inode and device."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    with SafetensorsFile(path) as f:
        return dict(f.metadata)


def load_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a file, read into memory (small files and tests)."""
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}


def is_safetensors_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in (".safetensors", ".sft")


def looks_like_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether a file begins like a safetensors file (a plausible header length, then ``{``)."""
    try:
        with open_regular(path) as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except (OSError, LoraToolError):
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= min(size - 8, MAX_HEADER_BYTES) and head[8:9] == b"{"
