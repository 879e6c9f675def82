"""An adapter file written while its modules are still being made (``extract``): module by module, the
header last (:class:`loratool.io.stream.SafetensorsStream`).

Only the kohya-style layouts are streamed, whose tensors are each a module's own
(:func:`loratool.formats.kohya.module_encoder`); the others (peft folders, diffusers' fused and
split projections) are written whole at the end by :func:`loratool.formats.write.write_adapter`.
:meth:`AdapterStream.finish` encodes the finished adapter as that function would and hands the
result to the stream, which checks it against what was written: the file holds exactly what
``write_adapter`` would put in it (in another order), or is rewritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from loratool.core.modules import Adapter, Module
from loratool.errors import LoraToolError
from loratool.io.stream import SafetensorsStream, header_room
from loratool.io.writer import dtype_name

if TYPE_CHECKING:
    import torch

    from loratool.io.output import Outputs

SLACK = 1024  # header bytes beyond the estimate: the sshs_* hashes (~130) and network keys a digit longer


class AdapterStream:
    """One adapter file being streamed: :meth:`add` each module as it is made, then :meth:`finish`."""

    def __init__(self, stream: SafetensorsStream, encode: Callable[[Module], dict[str, torch.Tensor]],
                 fmt: str, shown: str | os.PathLike[str]):
        self.stream, self._encode, self.fmt, self._shown = stream, encode, fmt, shown

    def add(self, modules: Iterable[Module]) -> None:
        """Stream ``modules`` (one batch of an extraction), their tensors in the order they lie in memory:
        a batch's factors are views of a few host tensors, and its scalars (kohya's alphas) are gathered
        into one tensor a dtype, so that the stream writes the batch as a few runs, not one a module."""
        tensors: dict[str, torch.Tensor] = {}
        for module in modules:
            tensors.update(self._encode(module))
        _gather_scalars(tensors)
        with self._naming_output():
            self.stream.add(dict(sorted(tensors.items(), key=_in_memory_order(tensors.values()))))

    def finish(self, adapter: Adapter, metadata: Mapping[str, str] | None = None) -> bool:
        """Complete the file as :func:`~loratool.formats.write.write_adapter` would write ``adapter`` with
        ``metadata``; False when what was streamed could not stand and the file was written again."""
        from loratool.formats.write import _encode

        tensors, meta = _encode(adapter, self.fmt, metadata)
        with self._naming_output():
            return self.stream.finish(tensors, meta)

    @property
    def busy_s(self) -> float:
        return self.stream.busy_s

    @property
    def busy_parts(self) -> dict[str, float]:
        """``busy_s`` by step: judging finiteness, hashing, writing, starting write-back to disk."""
        return {k: round(v, 4) for k, v in self.stream.parts.items()}

    @contextlib.contextmanager
    def _naming_output(self) -> Iterator[None]:
        try:
            yield
        except LoraToolError as e:
            if e.path is None:  # a tensor refused: say which output it was for
                raise LoraToolError(e.message, self._shown) from None
            raise


def _gather_scalars(tensors: dict[str, torch.Tensor]) -> None:
    """Replace the 0-d tensors of ``tensors`` by views of one new tensor per dtype (the same values)."""
    import torch

    groups: dict[torch.dtype, list[str]] = {}
    for name, t in tensors.items():
        if t.dim() == 0 and t.device.type == "cpu":
            groups.setdefault(t.dtype, []).append(name)
    for names in groups.values():
        if len(names) > 1:
            tensors.update(zip(names, torch.stack([tensors[n] for n in names]).unbind(), strict=True))


def _in_memory_order(tensors: Iterable[torch.Tensor]) -> Callable[[tuple[str, torch.Tensor]], tuple[int, int]]:
    """A sort key for ``(name, tensor)``: storages in the order they first appear, each one's tensors by
    their place in it (the same order on every run, unlike addresses)."""
    first: dict[int, int] = {}
    for t in tensors:
        first.setdefault(t.untyped_storage().data_ptr(), len(first))
    return lambda kv: (first[kv[1].untyped_storage().data_ptr()], kv[1].storage_offset())


def streams(fmt: str) -> bool:
    """Whether ``fmt`` (a layout name or alias) is written module by module."""
    from loratool.formats.kohya import NAMED_LAYOUTS
    from loratool.formats.layouts import writable_layout

    return writable_layout(fmt).name in NAMED_LAYOUTS


@contextlib.contextmanager
def stream_adapter(outputs: Outputs, path: str | os.PathLike[str], fmt: str, outline: Adapter,
                   metadata: Mapping[str, str]) -> Iterator[AdapterStream]:
    """An :class:`AdapterStream` into ``path`` (through ``outputs``: the file appears, complete, when the
    block ends without an error). ``outline``: every module the adapter may get, at its largest shapes
    and widest dtype (its tensors may be on the meta device); ``metadata``: values at least as long as
    the final ones will be (the header's room is reserved from both)."""
    from loratool.formats.diffusers import family_of
    from loratool.formats.kohya import module_encoder
    from loratool.formats.layouts import writable_layout

    layout = writable_layout(fmt)
    if not streams(layout.name):
        raise LoraToolError(f"the {layout.name} layout is written whole, not streamed")
    encode = module_encoder(outline, family_of(outline), layout.name)
    entries, total = [], 0
    for module in outline.modules.values():
        for name, t in encode(module).items():
            entries.append((name, dtype_name(t), tuple(t.shape)))
            total += math.prod(t.shape) * t.element_size()
    meta_bytes = len(json.dumps(dict(metadata), ensure_ascii=False).encode()) + len(_target_keys(outline, layout.name))
    room = header_room(entries, total, meta_bytes + SLACK)
    with outputs.file(path) as fh:
        stream = SafetensorsStream(fh, room)
        try:
            yield AdapterStream(stream, encode, layout.name, path)
        finally:
            stream.close()


def _target_keys(outline: Adapter, fmt: str) -> str:
    """The metadata the layout adds for the outline (kohya's network keys, modelspec), as JSON: the final
    adapter's are as long or within a few bytes (``SLACK`` covers those)."""
    from loratool.formats.write import target_metadata

    return json.dumps(target_metadata(outline, fmt), ensure_ascii=False)
