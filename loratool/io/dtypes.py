"""safetensors dtype names: their element sizes (no torch needed) and, built on first use, the
torch dtypes they stand for.

A header-only path (inspect, planning, ``--help``) reads dtype names and sizes from here and never
imports torch; a tensor read asks :func:`torch_dtype`, which imports torch then.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> bits per element
BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "I32": 32, "U32": 32, "I64": 64, "U64": 64,
    "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "C64": 64,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
}

# safetensors dtype name -> attribute of the torch module (absent from older torch builds for some)
_TORCH_ATTR: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}

FLOAT_NAMES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                         "F8_E8M0"})


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype | None]:
    """Every safetensors dtype name -> its torch dtype (None where this torch lacks it)."""
    import torch

    return {name: getattr(torch, attr, None) for name, attr in _TORCH_ATTR.items()}


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (None where this torch cannot hold it)."""
    return torch_dtypes().get(name)


@functools.cache
def names_by_torch() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype name (for writing)."""
    return {t: name for name, t in torch_dtypes().items() if t is not None}
