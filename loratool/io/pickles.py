"""Torch pickle files (``.pt``, ``.bin``, ``.ckpt``, ``.pth``), read safely or not at all.

Only torch's weights-only unpickler is ever used: it rebuilds tensors, containers and plain values
and refuses every other global, so no code in the file can run. A file that needs full
unpickling is refused with :class:`UnsupportedInput`, never loaded "just this once".

What comes back:

* a state dict (``name -> tensor``), unwrapped from ``{"state_dict": {...}}`` (Lightning /
  original SD ``.ckpt``) and with nested dicts of tensors flattened to dotted names;
* a bare list (or tuple) of tensors, returned as a list: cloneofsimo's legacy ``.pt`` LoRA,
  which the formats codec interprets (up/down pairs in order).

Non-tensor entries (``global_step``, ``epoch``, …) are not tensors; they are listed in
:attr:`PickleContents.ignored` so that nothing disappears without a word.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from loratool.errors import LoraToolError, UnsupportedInput
from loratool.io.mapped import note_mapped
from loratool.io.regular import open_regular, require_regular
from loratool.io.safetensors import looks_like_safetensors

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WHY = re.compile(r"(Unsupported global: GLOBAL [\w.<>]+|Unsupported operand \d+|Trying to [^.\n]+)")


@dataclass
class PickleContents:
    path: str
    layout: Literal["state_dict", "tensor_list"]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # for a list: "0", "1", …
    wrapper: str | None = None  # "state_dict" when the tensors were nested under it
    ignored: list[str] = field(default_factory=list)  # non-tensor entries, by dotted name

    def as_list(self) -> list[torch.Tensor]:
        return [self.tensors[str(i)] for i in range(len(self.tensors))]


def is_pickle_path(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).lower().endswith(PICKLE_SUFFIXES)


def _torch_load(path: str) -> object:
    """``torch.load`` with weights_only=True (memory-mapped for zip-format files)."""
    try:
        st = require_regular(path)  # a FIFO or a device would block or never end
    except FileNotFoundError:
        raise LoraToolError("no such file", path) from None
    except OSError as e:
        raise LoraToolError(f"cannot open: {e.strerror}", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise LoraToolError("is a folder, not a torch file", path)
    if st.st_size == 0:
        raise LoraToolError("not a torch file: it is empty (0 bytes)", path)
    if looks_like_safetensors(path):
        raise LoraToolError("is a safetensors file despite its name: read it as safetensors", path)
    import torch

    use_mmap = zipfile.is_zipfile(path)
    if use_mmap:
        note_mapped(path)  # its tensors are views of a map: the bus-error guard names it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text:
            found = _WHY.search(text)
            why = f" ({found.group(1)})" if found else ""
            raise UnsupportedInput(
                "this pickle needs full unpickling, which could run code hidden in it, so it is "
                f"refused{why}; convert it to .safetensors with a trusted tool (or ask its author for one)",
                path,
            ) from None
        raise LoraToolError(f"not a readable torch file: {_first_line(text)}", path) from None
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, AttributeError, IndexError,
            TypeError, MemoryError, zipfile.BadZipFile) as e:
        raise LoraToolError(f"not a readable torch file: {type(e).__name__}: {_first_line(str(e))}", path) from None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unreadable"
    return line if len(line) <= 160 else line[:157] + "..."


MAX_NAMES = 1_000_000  # entries a state dict may have (an SDXL checkpoint has ~2,500; LLMs ~1,000s)
MAX_DEPTH = 32  # dictionaries nested in dictionaries (a state dict nests 1 or 2)


@dataclass
class _Walk:
    path: str
    names: int = 0


def _flatten(obj: Mapping, prefix: str, out: dict[str, torch.Tensor], ignored: list[str], walk: _Walk,
             inside: frozenset[int] = frozenset(), depth: int = 1) -> None:
    """Nested dicts of tensors as dotted names, within bounds: at most :data:`MAX_NAMES` entries (a few
    kilobytes of shared nested dicts would flatten to 2^40 names) and :data:`MAX_DEPTH` levels, and no
    dict inside itself."""
    import torch

    if depth > MAX_DEPTH:
        raise LoraToolError(f"nests dictionaries more than {MAX_DEPTH} levels deep (at {prefix[:80]!r}): "
                            "not a state dict", walk.path)
    inside = inside | {id(obj)}
    for k, v in obj.items():
        walk.names += 1
        if walk.names > MAX_NAMES:
            raise LoraToolError(f"holds more than {MAX_NAMES:,} entries (shared nested dictionaries?): "
                                "not a state dict", walk.path)
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, Mapping):
            if id(v) in inside:
                raise LoraToolError(f"the dictionary at {name[:80]!r} contains itself: not a state dict", walk.path)
            _flatten(v, f"{name}.", out, ignored, walk, inside, depth + 1)
        else:
            ignored.append(name)


def read_pickle(path: str | os.PathLike[str]) -> PickleContents:
    """Read a torch pickle with the weights-only unpickler and say what shape it has."""
    import torch

    p = os.fspath(path)
    obj = _torch_load(p)
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(t, torch.Tensor) for t in obj):
            return PickleContents(p, "tensor_list", {str(i): t for i, t in enumerate(obj)})
        raise LoraToolError("holds a list that is not a list of tensors; nothing to read", p)
    if isinstance(obj, torch.Tensor):
        return PickleContents(p, "tensor_list", {"0": obj})
    if not isinstance(obj, Mapping):
        raise LoraToolError(f"holds a {type(obj).__name__}, not a state dict or a list of tensors", p)
    wrapper = None
    inner = obj.get("state_dict")
    if isinstance(inner, Mapping):
        wrapper = "state_dict"
        ignored = [k for k in obj if k != "state_dict"]
        obj = inner
    else:
        ignored = []
    tensors: dict[str, torch.Tensor] = {}
    _flatten(obj, "", tensors, ignored, _Walk(p))
    if not tensors and obj:
        raise LoraToolError("holds no tensors", p)
    return PickleContents(p, "state_dict", tensors, wrapper, ignored)


def load_pickle(path: str | os.PathLike[str]) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """A state dict, or the bare list of tensors of a legacy cloneofsimo ``.pt``."""
    contents = read_pickle(path)
    return contents.as_list() if contents.layout == "tensor_list" else contents.tensors


def looks_like_pickle(p: str | os.PathLike[str]) -> bool:
    """Whether the file starts as a zip (torch's format) or a protocol 2-5 pickle does."""
    try:
        with open_regular(p) as fh:
            head = fh.read(4)
    except (OSError, LoraToolError):
        return False
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
