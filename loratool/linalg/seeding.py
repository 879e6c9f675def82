"""Per-module random streams that give the same numbers on every run and every machine.

A module's sketch is drawn from a CPU generator seeded from ``sha256(seed, name)``, so the result
of a randomized decomposition depends on the module and the global seed only — not on the order
modules are processed in, on batching, or on how many ran before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from the global seed and the module's name."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def module_generator(seed: int, name: str) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(module_seed(seed, name))
    return gen


def gaussian_sketch(rows: int, cols: int, seed: int, names: Sequence[str],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``[len(names), rows, cols]`` float32 standard normal test matrices, one stream per name.

    Drawn on the CPU (so the bytes never depend on the device) and then moved.
    """
    out = torch.empty((len(names), rows, cols), dtype=torch.float32)
    for i, name in enumerate(names):
        out[i] = torch.randn((rows, cols), generator=module_generator(seed, name), dtype=torch.float32)
    return out.to(device)
