"""Start-up of an extraction, overlapped with planning: torch is imported, the device chosen and,
on CUDA, the context created and the cuBLAS/cuSOLVER kernels extract uses loaded on a thread,
while the caller parses headers and plans (both torch-free). Importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def start_device(resolve: Callable[[], Any]) -> Future:
    """A future of ``resolve()`` (which imports torch and returns a ``torch.device``), warmed up: the
    caller must import nothing that needs torch until it has taken the result (imports that wait
    on each other across threads can deadlock)."""
    return _background(_warm, resolve)


def warming(device: Any) -> Future:
    """:func:`warm_kernels` on a thread of its own, so that loading the kernels overlaps the first reads; take
    the future's result before the first batch is decomposed."""
    return _background(warm_kernels, device)


def _background(fn: Callable[..., Any], *args: Any) -> Future:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratool-startup")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def _warm(resolve: Callable[[], Any]) -> Any:
    device = resolve()
    if device.type != "cuda":
        return device
    import torch

    warm_kernels(device)
    torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    return device


def warm_kernels(device: Any) -> None:
    """Run the kernels a batch runs once (matmuls, Cholesky, triangular solves, a small SVD), on this thread.
    Besides loading them early, this must happen before two threads decompose at once: torch loads its CUDA
    linear-algebra library on the first such call and refuses a second first call made meanwhile ("lazy
    wrapper should be called at most once")."""
    import torch

    from loratool.linalg import randomized_svd

    with torch.cuda.device(device):
        randomized_svd(torch.randn(2, 96, 48, device=device), 8, names=["warm-up a", "warm-up b"])
        torch.cuda.synchronize(device)
