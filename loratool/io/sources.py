"""Tensor sources: one lazy, read-only view of whatever a user points a command at.

``open_source(path)`` accepts

* a safetensors file (``kind="safetensors"``), or a folder holding only a diffusers
  ``pytorch_lora_weights.safetensors``;
* a torch pickle (``kind="pickle"``), read with the weights-only loader only;
* a peft adapter folder (``kind="peft"``): ``adapter_config.json`` (parsed, as ``.config``) plus
  ``adapter_model.safetensors`` (or ``.bin``); or a folder of such folders, one per component
  (``unet/``, ``text_encoder/``), with keys ``"<component>.<key>"``;
* a diffusers pipeline folder (``kind="diffusers"``): ``model_index.json`` and component folders;
  keys are ``"<component>.<param>"`` (``unet.conv_in.weight``) and ``.components`` maps each
  component to its own parameter names;
* a folder whose weights sit at its root (``kind="component"``): a diffusers component
  (``unet/``, ``text_encoder/``, …) or a Hugging Face model folder (``model.safetensors`` or a
  sharded ``model.safetensors.index.json``, ``config.json`` as ``.config``); single or sharded,
  with dtype variants (``diffusion_pytorch_model.fp16.safetensors``).

Headers are read up front (without torch); tensors are read one at a time, whole with
:meth:`TensorSource.get` or a range of rows into a caller's buffer with :meth:`TensorSource.read`,
by positional reads: nothing is memory-mapped (pickles excepted, which torch loads its own way).
Reads are thread-safe, so a prefetch thread (:mod:`loratool.io.prefetch`) can read ahead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoraToolError
from loratool.io.jsontext import JsonLimit, NonFinite, parse_json
from loratool.io.pickles import is_pickle_path, looks_like_pickle
from loratool.io.regular import open_regular, require_regular
from loratool.io.safetensors import (
    Rows,
    SafetensorsFile,
    TensorInfo,
    is_safetensors_path,
    looks_like_safetensors,
)

if TYPE_CHECKING:
    import torch

COMPONENT_NAMES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae",
                   "prior", "decoder", "image_encoder")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
LORA_FILES = ("pytorch_lora_weights.safetensors",)
MAX_JSON_BYTES = 50_000_000


class MissingKey(LoraToolError, KeyError):
    """A key the source does not hold (also a KeyError, for mapping-style callers)."""

    def __str__(self) -> str:
        return self.one_line()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a small config file (a regular file, bounded: :mod:`loratool.io.jsontext`),
    or a one-line error naming it."""
    try:
        with open_regular(path) as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise LoraToolError(f"{what} is too large to be a config file", path)
        data = parse_json(raw.decode("utf-8"))
    except OSError as e:
        raise LoraToolError(f"cannot read {what}: {e.strerror}", path) from None
    except (JsonLimit, NonFinite) as e:
        raise LoraToolError(f"{what} cannot be used: {e}", path) from None
    except (ValueError, RecursionError):
        raise LoraToolError(f"{what} is not valid JSON", path) from None
    if not isinstance(data, dict):
        raise LoraToolError(f"{what} is not a JSON object", path)
    return data


class TensorSource:
    """Common interface. Keys are in a stable order; header facts (:meth:`info`, :meth:`shape`)
    need no torch; reads return tensors in their stored dtype."""

    kind: str = ""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.metadata: dict[str, str] = {}
        self.config: dict[str, Any] | None = None
        self.components: dict[str, list[str]] = {}

    # subclasses -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        """Header facts of one tensor: dtype name, shape, byte size (offsets: within its file)."""
        raise NotImplementedError

    def read(self, key: str, rows: Rows | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """A tensor, or rows ``[start, stop)`` of its first dim, in its stored dtype; into ``out``
        (a contiguous CPU uint8 buffer of at least :meth:`nbytes` bytes, e.g. pinned) when given."""
        raise NotImplementedError

    def location(self, key: str) -> tuple[str, str]:
        """(the file that holds ``key``, its name in that file)."""
        raise NotImplementedError

    def extent(self, key: str, rows: Rows | None = None) -> tuple[str, int, int] | None:
        """(file, byte offset, length) of the stored bytes of ``key`` (or of rows of it) as one range of a
        file, for telling the OS what will be read; None where they are not (a pickle: torch loads it
        whole, its own way)."""
        return None

    def close(self) -> None:
        pass

    # shared -------------------------------------------------------------------------------
    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype name (``F16``, ``BF16``, …) without importing torch."""
        return self.info(key).dtype

    def dtype(self, key: str) -> torch.dtype:
        from loratool.io.dtypes import torch_dtype

        found = torch_dtype(self.dtype_name(key))
        if found is None:
            raise LoraToolError(f"tensor {key!r} has dtype {self.dtype_name(key)}, which this torch cannot hold",
                                self.location(key)[0])
        return found

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key's shape, from the headers."""
        return {k: self.shape(k) for k in self.keys()}

    def nbytes(self, key: str, rows: Rows | None = None) -> int:
        try:
            return self.info(key).rows(rows)[1]
        except IndexError as e:
            raise LoraToolError(f"cannot read {e}", self.location(key)[0]) from None

    def get(self, key: str) -> torch.Tensor:
        """One whole tensor."""
        return self.read(key)

    def _missing(self, key: str) -> MissingKey:
        return MissingKey(f"no tensor named {key!r}", self.path)

    def __contains__(self, key: object) -> bool:
        return key in set(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) one at a time."""
        for k in self.keys():
            yield k, self.get(k)

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.path!r} ({len(self)} tensors)>"


class SafetensorsSource(TensorSource):
    """One safetensors file (``.file`` is the open :class:`SafetensorsFile`)."""

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path)
        self.file = SafetensorsFile(path)
        self.metadata = dict(self.file.metadata)

    def keys(self) -> list[str]:
        return self.file.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.file

    def info(self, key: str) -> TensorInfo:
        return self.file.info(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.file.dtype(key)

    def read(self, key: str, rows: Rows | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.file.read(key, rows, out)

    def get(self, key: str) -> torch.Tensor:
        return self.file.get(key)

    def extent(self, key: str, rows: Rows | None = None) -> tuple[str, int, int] | None:
        return (self.path, *self.file.extent(key, rows))

    def location(self, key: str) -> tuple[str, str]:
        self.file.info(key)
        return self.path, key

    def close(self) -> None:
        self.file.close()


def open_file(path: str | os.PathLike[str]) -> TensorSource:
    """A single tensor file: ``.safetensors``/``.sft`` and pickle suffixes by name; any other name by
    its first bytes (a safetensors header, else zip/pickle magic), defaulting to safetensors (whose
    reader then says what is wrong)."""
    p = Path(path)
    if is_safetensors_path(p) or looks_like_safetensors(p):  # people do rename safetensors to .bin
        return SafetensorsSource(p)
    if is_pickle_path(p) or looks_like_pickle(p):
        from loratool.io.pickle_source import PickleSource

        return PickleSource(p)
    return SafetensorsSource(p)


class MultiSource(TensorSource):
    """Several files seen as one: ``key -> (file, key in that file)``, files opened when first needed
    (under a lock: reader threads may open them)."""

    def __init__(self, path: str | os.PathLike[str], kind: str, where: dict[str, tuple[Path, str]]):
        super().__init__(path)
        self.kind = kind
        self._where = where
        self._open: dict[Path, TensorSource] = {}
        self._lock = threading.Lock()

    def _file(self, key: str) -> tuple[TensorSource, str]:
        try:
            file, inner = self._where[key]
        except KeyError:
            raise self._missing(key) from None
        src = self._open.get(file)
        if src is None:
            with self._lock:
                src = self._open.get(file)
                if src is None:
                    src = self._open[file] = open_file(file)
        if inner not in src:
            raise LoraToolError(f"the shard index lists {inner!r} in {os.path.basename(src.path)}, which lacks it",
                                self.path)
        return src, inner

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def info(self, key: str) -> TensorInfo:
        src, inner = self._file(key)
        return src.info(inner)

    def dtype(self, key: str) -> torch.dtype:
        src, inner = self._file(key)
        return src.dtype(inner)

    def read(self, key: str, rows: Rows | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        src, inner = self._file(key)
        return src.read(inner, rows, out)

    def get(self, key: str) -> torch.Tensor:
        src, inner = self._file(key)
        return src.get(inner)

    def extent(self, key: str, rows: Rows | None = None) -> tuple[str, int, int] | None:
        src, inner = self._file(key)
        return src.extent(inner, rows)

    def location(self, key: str) -> tuple[str, str]:
        try:
            file, inner = self._where[key]
        except KeyError:
            raise self._missing(key) from None
        return os.fspath(file), inner

    def component(self, name: str) -> MultiSource:
        """One component of a diffusers folder, with its own (unprefixed) keys."""
        if name not in self.components:
            raise LoraToolError(f"no component {name!r} (it has: {', '.join(self.components) or 'none'})",
                                self.path)
        prefix = f"{name}."
        where = {k[len(prefix):]: v for k, v in self._where.items() if k.startswith(prefix)}
        sub = MultiSource(Path(self.path) / name, "component", where)
        sub.components = {name: list(where)}
        return sub

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()


def open_source(path: str | os.PathLike[str], variant: str | None = None) -> TensorSource:
    """Open whatever ``path`` is (see the module docstring) for lazy reading."""
    from loratool.io.folders import (
        has_component_folders,
        open_component,
        open_diffusers,
        open_peft,
        open_peft_components,
    )

    p = Path(path)
    try:
        require_regular(p)  # a FIFO or a device would block or never end
    except FileNotFoundError:
        raise LoraToolError("no such file or folder", p) from None
    except OSError as e:
        raise LoraToolError(f"cannot open: {e.strerror}", p) from None
    if not p.is_dir():
        return open_file(p)
    try:
        entries = sorted(x.name for x in p.iterdir())
    except OSError as e:
        raise LoraToolError(f"cannot list the folder: {e.strerror}", p) from None
    if not entries:
        raise LoraToolError("the folder is empty", p)
    if "adapter_config.json" in entries:
        return open_peft(p)
    if "model_index.json" in entries:
        return open_diffusers(p, variant)
    source = open_component(p, variant)
    if source is not None:
        return source
    for name in LORA_FILES:
        if name in entries:
            return open_file(p / name)
    peft = open_peft_components(p)
    if peft is not None:
        return peft
    if has_component_folders(p):  # a pipeline folder without its model_index.json
        return open_diffusers(p, variant, indexed=False)
    raise LoraToolError("nothing loratool can read in this folder (expected adapter_config.json, "
                        "model_index.json, pytorch_lora_weights.safetensors, a component's "
                        "diffusion_pytorch_model / model weights or an HF model.safetensors[.index.json])", p)
