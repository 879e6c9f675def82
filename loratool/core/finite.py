"""Whether a tensor holds only finite numbers, fast enough to ask of every tensor the tool reads or writes.

A float32 sum of a chunk is NaN or ±inf whenever one of its elements is; it is also infinite when huge
finite values overflow it, so only a chunk whose sum is not finite is looked at element by element. On the
CPU the sum takes a sixtieth of ``isfinite``'s time for fp32 and allocates nothing the size of the chunk.
A 16-bit chunk is judged by its minimum and maximum instead (NaN propagates through both, and ±inf is an
extreme): exact, and 4-7 times faster than its float32 sum (10 GB/s against 1.5-3 GB/s on one core).

On the CPU the sum runs on the calling thread alone. It is bound by memory, so a second thread hardly
speeds it up, and torch's worker threads keep spinning after each parallel sum: over the 2000 tensors of
an SDXL LoRA they took the second core from the writer's hashing thread (the write of a 435 MiB file took
0.90 s instead of 0.72 s, with twice the CPU time).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHUNK = 1 << 22  # elements summed at a time (bounds any temporary the sum or isfinite makes)


def all_finite(t: torch.Tensor) -> bool:
    """True when a floating-point (or complex) tensor holds no NaN and no ±inf; other tensors are finite."""
    import torch

    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    flat = t.detach().reshape(-1)
    if t.is_complex():
        flat = torch.view_as_real(flat.resolve_conj()).reshape(-1)
    widen = flat.element_size() == 1  # fp8: neither sum nor isfinite has a kernel for it everywhere
    threads = torch.get_num_threads() if flat.device.type == "cpu" else 1
    if threads > 1:
        torch.set_num_threads(1)
    try:
        for lo in range(0, flat.numel(), CHUNK):
            part = flat[lo:lo + CHUNK]
            part = part.float() if widen else part
            if part.element_size() == 2:  # fp16, bf16: the extremes, exact (NaN propagates), 4-7x the sum's speed
                if not all(math.isfinite(v) for v in torch.aminmax(part)):
                    return False
                continue
            if math.isfinite(torch.sum(part, dtype=torch.float32)):
                continue
            if not bool(torch.isfinite(part).all()):
                return False
        return True
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
