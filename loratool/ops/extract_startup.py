"""Start-up of an extraction, overlapped with planning: torch is imported, the device chosen and,
on CUDA, the context created and the cuBLAS/cuSOLVER kernels extract uses loaded on a thread,
while the caller parses headers and plans (both torch-free). Importing this module imports no torch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_WARMING: dict[str, Future] = {}  # one warm-up per device and process (a failed one is tried again)
_WARMING_LOCK = threading.Lock()


def start_device(resolve: Callable[[], Any]) -> Future:
    """A future of ``resolve()`` (which imports torch and returns a ``torch.device``), warmed up: the
    caller must import nothing that needs torch until it has taken the result (imports that wait
    on each other across threads can deadlock)."""
    return _background(_warm, resolve)


def warming(device: Any) -> Future:
    """:func:`warm_kernels` on a thread of its own, so that loading the kernels overlaps planning and the
    first reads; take the future's result (the ``time.perf_counter()`` at which it ended) before the first
    batch is decomposed. Started once per device and process: later calls get the same future (done at
    once when the kernels are loaded)."""
    import loratool.ops.extract_batch  # noqa: F401  what warm_kernels runs, imported here, not across threads

    key = str(device)
    with _WARMING_LOCK:
        future = _WARMING.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = _WARMING[key] = _background(_ended, warm_kernels, device)
    return future


def _background(fn: Callable[..., Any], *args: Any) -> Future:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratool-startup")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def _ended(fn: Callable[..., Any], *args: Any) -> float:
    fn(*args)
    return time.perf_counter()


def _warm(resolve: Callable[[], Any]) -> Any:
    device = resolve()
    if device.type != "cuda":
        return device
    import torch

    warming(device).result()
    torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    return device


def warm_kernels(device: Any) -> None:
    """Run, once, what a batch runs (:func:`warm_up_batches` through ``extract_batch``: bit comparison,
    float32 ΔW, norms, the sketch, CholeskyQR, the batched float64 core SVD, the split, the casts, the
    residual), on this thread and a stream of its own. The GPU loads each kernel on its first launch; here
    that happens beside planning and the first reads, not in the first batch. Besides, this must happen
    before two threads decompose at once: torch loads its CUDA linear-algebra library on the first such
    call and refuses a second first call made meanwhile ("lazy wrapper should be called at most once")."""
    import torch

    from loratool.ops.extract_batch import extract_batch
    from loratool.ops.extract_plan import ExtractOptions

    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
        for pair in warm_up_batches(device):
            extract_batch(pair, ExtractOptions(rank=WARM_RANK), pair.base.dtype)
        torch.cuda.synchronize(device)


WARM_RANK = 8


def warm_up_batches(device: Any) -> list:
    """Two tiny batches of three 96×48 modules, fp16 and bf16 (the stored dtypes of nearly every checkpoint),
    the middle module unchanged: small enough to cost nothing, large enough for the randomized path."""
    import torch

    from loratool.io.weights import Segment, WeightRef
    from loratool.ops.extract_plan import PlannedModule
    from loratool.ops.extract_stream import PairBatch

    shape, gen = (96, 48), torch.Generator(device=device).manual_seed(0)
    mods = [PlannedModule("unet", f"warm-up.{i}", shape, WeightRef((Segment(f"warm-up.{i}"),), shape), WARM_RANK)
            for i in range(3)]
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        base = torch.randn(3, *shape, device=device, generator=gen)
        change = torch.randn(3, shape[0], 4, device=device, generator=gen) @ torch.randn(
            3, 4, shape[1], device=device, generator=gen)
        change[1] = 0
        out.append(PairBatch(mods, base.to(dtype), (base + change).to(dtype)))
    return out
