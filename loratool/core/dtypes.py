"""The dtype names users type (``--dtype fp16|bf16|fp32``), in one place.

``DTYPE_NAMES`` is torch-free (command-line choices, ``--help``); ``DTYPES`` (name -> torch dtype) imports
torch when first asked for.
"""

from __future__ import annotations

from typing import Any

DTYPE_NAMES: tuple[str, ...] = ("fp32", "fp16", "bf16")


def __getattr__(name: str) -> Any:
    if name == "DTYPES":
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
