"""The dtype names users type (``--dtype fp16|bf16|fp32``), in one place."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
