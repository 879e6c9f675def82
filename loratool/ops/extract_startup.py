"""Start-up of an extraction, overlapped with planning: torch is imported, the device chosen and,
on CUDA, the context created and the cuBLAS/cuSOLVER kernels extract uses loaded on threads of its own,
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
    residual). The GPU loads each kernel on its first launch; here that happens beside planning and the
    first reads, not in the first batch. Besides, this must happen before two threads decompose at once:
    torch loads its CUDA linear-algebra library on the first such call and refuses a second first call
    made meanwhile ("lazy wrapper should be called at most once").

    Loading overlaps across threads, so it runs in two rounds of two threads, each on a stream of its
    own: the solver library's first calls beside cuBLAS's and the sketch's, then the fp16 batch beside
    the bf16 one. On an H100 (fresh interpreters, medians of three) the libraries' first calls took
    0.27 s one after the other and 0.18 s side by side; the warm-up took 0.43 s instead of 0.46 s, and
    the first real batch after it (a new thread, 4×640×640) 0.012 s instead of 0.040 s: the firsts'
    96×48 shapes load kernels the tiny batches alone did not."""
    import torch

    from loratool.linalg.randomized import load_solvers
    from loratool.ops.extract_batch import extract_batch
    from loratool.ops.extract_plan import ExtractOptions

    _on_threads(device, [load_solvers, _first_blas])
    with torch.cuda.device(device):
        pairs = warm_up_batches(device)
        torch.cuda.synchronize(device)  # made on this thread's stream, used on the others'
    _on_threads(device, [lambda _, p=p: extract_batch(p, ExtractOptions(rank=WARM_RANK), p.base.dtype) for p in pairs])


def _on_threads(device: Any, jobs: list[Callable[[Any], None]]) -> None:
    """Each ``job(device)`` on a thread and a stream of its own, all at once; returns when every one has
    finished on the device, raising the first one's error."""
    import torch

    def run(job: Callable[[Any], None]) -> None:
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
            job(device)
            torch.cuda.current_stream().synchronize()

    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="loratool-warm") as pool:
        for future in [pool.submit(run, job) for job in jobs]:
            future.result()


def _first_blas(device: Any) -> None:
    """cuBLAS's first calls (float32 batched products, float64 ones) and the seeded sketch's, without the
    linear-algebra library (that is ``load_solvers``', on the other thread)."""
    import torch

    from loratool.linalg.seeding import gaussian_sketch

    a = gaussian_sketch(96, 48, 0, ("warm-up.0", "warm-up.1"), device)
    torch.baddbmm(a, a, a.mT @ a, alpha=-1)
    a.double().mT @ a.double()


WARM_RANK = 8


def warm_up_batches(device: Any) -> list:
    """Two tiny batches of three 96×48 modules, fp16 and bf16 (the stored dtypes of nearly every checkpoint),
    the middle module unchanged: small enough to cost nothing, large enough for the randomized path."""
    import torch

    from loratool.io.weights import Segment, WeightRef
    from loratool.linalg.seeding import gaussian_sketch
    from loratool.ops.extract_plan import PlannedModule
    from loratool.ops.extract_stream import PairBatch

    (rows, cols), names = (96, 48), [f"warm-up.{i}" for i in range(3)]
    mods = [PlannedModule("unet", n, (rows, cols), WeightRef((Segment(n),), (rows, cols)), WARM_RANK) for n in names]

    def draw(r: int, c: int, part: str) -> torch.Tensor:  # seeded per name; torch's own random state untouched
        return gaussian_sketch(r, c, 0, [f"{n}.{part}" for n in names], device)

    out = []
    for dtype in (torch.float16, torch.bfloat16):
        base = draw(rows, cols, f"{dtype}.base")
        change = draw(rows, 4, f"{dtype}.left") @ draw(4, cols, f"{dtype}.right")
        change[1] = 0
        out.append(PairBatch(mods, base.to(dtype), (base + change).to(dtype)))
    return out
