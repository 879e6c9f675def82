"""Per-module random streams that give the same numbers on every run and every machine.

A module's sketch is drawn from a generator on the compute device (CPU: mt19937, CUDA: Philox)
seeded from ``sha256(seed, name)``, so the result of a randomized decomposition depends on the
module, the global seed and the kind of device only — not on the order modules are processed in,
on batching, or on how many ran before it — and a rerun gives the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from the global seed and the module's name."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def module_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(module_seed(seed, name))
    return gen


def gaussian_sketch(rows: int, cols: int, seed: int, names: Sequence[str],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``[len(names), rows, cols]`` float32 standard normal test matrices, one stream per name,
    drawn on ``device`` (no host-side generation or copy on a GPU)."""
    device = torch.device(device)
    out = torch.empty((len(names), rows, cols), dtype=torch.float32, device=device)
    for i, name in enumerate(names):
        torch.randn((rows, cols), generator=module_generator(seed, name, device), out=out[i])
    return out
