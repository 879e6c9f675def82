"""A torch pickle as a :class:`~loratool.io.sources.TensorSource` (``kind="pickle"``): read with the
weights-only loader of :mod:`loratool.io.pickles`, whole, then served from memory."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from loratool.errors import LoraToolError
from loratool.io.dtypes import names_by_torch
from loratool.io.safetensors import Rows, TensorInfo
from loratool.io.sources import TensorSource

if TYPE_CHECKING:
    import torch

    from loratool.io.pickles import PickleContents


class PickleSource(TensorSource):
    """A weights-only pickle; ``layout`` is "state_dict" or "tensor_list" (cloneofsimo legacy).
    torch loads it whole (memory-mapped for zip files): reads are copies or views of that."""

    kind = "pickle"

    def __init__(self, path: str | os.PathLike[str]):
        from loratool.io.pickles import read_pickle

        super().__init__(path)
        self.contents: PickleContents = read_pickle(path)
        self.layout = self.contents.layout
        self.ignored = list(self.contents.ignored)

    def _t(self, key: str) -> torch.Tensor:
        try:
            return self.contents.tensors[key]
        except KeyError:
            raise self._missing(key) from None

    def keys(self) -> list[str]:
        return list(self.contents.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.contents.tensors

    def info(self, key: str) -> TensorInfo:
        t = self._t(key)
        name = names_by_torch().get(t.dtype)
        if name is None:
            raise LoraToolError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot name", self.path)
        nbytes = t.numel() * t.element_size()
        return TensorInfo(key, name, tuple(t.shape), 0, nbytes)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t(key).dtype

    def read(self, key: str, rows: Rows | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self._t(key)
        if rows is not None:
            self.nbytes(key, rows)  # checks the range
            t = t[rows[0]:rows[1]]
        if out is None:
            return t
        n = t.numel() * t.element_size()
        view = out[:n].view(t.dtype).reshape(t.shape)
        view.copy_(t)
        return view

    def get(self, key: str) -> torch.Tensor:
        return self._t(key)

    def location(self, key: str) -> tuple[str, str]:
        self._t(key)
        return self.path, key

    def as_list(self) -> list[torch.Tensor]:
        return self.contents.as_list()

    def close(self) -> None:
        self.contents.tensors = {}
