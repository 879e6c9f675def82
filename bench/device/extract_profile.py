"""Where extract's GPU time goes: one device call, tables printed, nothing asserted.

1. *compute alone* — for each layout's real batch list (same-shaped groups as the extractor forms them,
   made on any machine by ``--make-batches`` from the key tables: header-only sparse files, nothing
   read), a synthetic ΔW per batch on the GPU and the work ``extract_batch`` does on it
   (``decompose_batch`` + split + cast + residual + factors to the host), synchronised per batch and
   summed per shape; the SDXL list again under torch.profiler (top ops by GPU time and by host time).
2. *the small SVD* — ``torch.linalg.svd`` of each batch's ``[b, ℓ, ℓ]`` core with each cuSOLVER driver,
   on the CPU, and by ``eigh`` of its Gram matrix.
3. *orthonormalisation* — CholeskyQR2 as the library runs it, beside a variant that inverts the small
   Cholesky factor and multiplies (one GEMM instead of a triangular solve), and Householder QR.
0. *start-up* — fresh interpreters: bare python, importing torch, the first CUDA calls one by one, and
   the whole command on the bundled tiny pair beside its report's own seconds; *warm*: after the CUDA
   context, the kernel warm-up and the first batches of work after it, each on a fresh thread and stream.
4. *in process* — the real ``extract`` on a written SDXL pair: the stage clock, then per-batch compute
   with a synchronisation after each batch (so the cost of each shape group shows), then under the
   profiler, with how much of the run the GPU was computing (the union of its kernels' intervals).

    python bench/device/extract_profile.py --make-batches .dev/batches.json --keyshapes .dev/keyshapes   # here
    python bench/device/extract_profile.py --batches .dev/batches.json --keyshapes .dev/keyshapes --out DIR  # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

DEV = "cuda"  # --device (cpu: a smoke test of this script)
JOBS = {"sdxl": (64, "attn+conv"), "flux": (32, "transformer"), "sd3": (32, "transformer")}


def make_batches(out: Path, keyshapes: Path) -> None:
    """The batch lists of the benchmark pairs, from header-only sparse files (no tensor is read)."""
    from extract_pairs import _header, checkpoint_table

    from loratool.ops.extract_plan import build_plan, open_pair
    from loratool.ops.extract_stream import CUDA_BATCH_BYTES, pair_batches

    lists = {}
    for layout, (rank, targets) in JOBS.items():
        table = checkpoint_table(layout, keyshapes)
        head = _header(table)
        size = len(head) + sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, s, d, _ in table)
        path = out.parent / f"{layout}_sparse.safetensors"
        path.write_bytes(head)
        os.truncate(path, size)
        try:
            with open_pair(path, path) as (b, t):
                plan = build_plan(b, t, _options(rank, targets))
                jobs = pair_batches(b, t, plan.modules, CUDA_BATCH_BYTES[1])  # an 80 GB card's
        finally:
            path.unlink()
        lists[layout] = [[list(j[0].matrix_shape), len(j), j[0].rank] for j in jobs]
        print(f"{layout}: {len(plan.modules)} modules in {len(jobs)} batches")
    out.write_text(json.dumps(lists))


def _options(rank: int, targets: str, device: str | None = None):
    from loratool.ops.extract_plan import ExtractOptions

    return ExtractOptions(rank=rank, conv_rank=rank, targets=targets, device=device or DEV)


def _delta(b: int, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    q = min(m, n, 256)
    s = torch.arange(1, q + 1, device=DEV, dtype=torch.float32) ** -0.8
    a = torch.randn(b, m, q, device=DEV, generator=gen) * s
    x = a @ torch.randn(b, q, n, device=DEV, generator=gen) / math.sqrt(n)
    return x + 0.05 * torch.randn(b, m, n, device=DEV, generator=gen) / math.sqrt(n)


def _work(delta: torch.Tensor, rank: int, names: list[str]) -> None:
    """What extract_batch does with a changed batch at a fixed rank: the decomposition launched, the fp16
    factors and their errors formed from it, all of it to the host in one transfer, then settled."""
    from loratool.linalg import start_batch
    from loratool.ops.extract_batch import _factors, to_host

    pending = start_batch(delta, names, rank)
    up, down, err = _factors(delta, pending.u, pending.s, pending.vh, torch.float16)
    head, *_ = to_host(pending.head(), err, up, down)
    pending.settle(head)


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def compute_alone(lists: dict, layouts: list[str], out: list[str]) -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    _work(_delta(2, 256, 128, gen), 8, ["w0", "w1"])  # kernels loaded
    for layout in layouts:
        per_shape: dict[tuple, list[float]] = defaultdict(lambda: [0, 0, 0.0])
        total = 0.0
        for (m, n), b, rank in lists[layout]:
            d = _delta(b, m, n, gen)
            names = [f"{layout}.{m}x{n}.{i}.{total}" for i in range(b)]
            dt = _sync_time(lambda d=d, names=names, rank=rank: _work(d, rank, names))
            total += dt
            row = per_shape[(m, n)]
            row[0] += 1
            row[1] += b
            row[2] += dt
            del d
        out.append(f"\n### compute alone: {layout} ({len(lists[layout])} batches) — {total:.3f} s\n")
        out.append("| shape | batches | modules | s | ms/batch | GFLOP/s (≈ 12·m·n·ℓ per module) |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        rank = lists[layout][0][2]
        for (m, n), (nb, nm, s) in sorted(per_shape.items(), key=lambda kv: -kv[1][2])[:12]:
            flop = 12 * m * n * 2 * rank * nm
            out.append(f"| {m}×{n} | {nb} | {nm} | {s:.3f} | {1000 * s / nb:.1f} | {flop / s / 1e9:.0f} |")
        print("\n".join(out[-16:]), flush=True)


def merged_shapes(batch_list: list, budget: int = 128 << 20, waste: float = 1.5, slack: int = 8 << 20) -> list:
    """A layout's batches regrouped across shapes: every module turned tall, sorted by size, and packed
    greedily into zero-padded ``[b, M, N]`` batches of at most ``budget`` elements a side whose padded
    elements stay within ``waste`` × their own plus ``slack`` (a prototype: is a batch's fixed cost worth
    padding away?). Returns ``[((M, N), [(m, n) of each module], rank), ...]``."""
    mods = sorted(((max(m, n), min(m, n), r) for (m, n), b, r in batch_list for _ in range(b)),
                  key=lambda x: (-x[2], -x[0] * x[1]))
    out: list = []
    for m, n, r in mods:
        if out and out[-1][2] == r:
            (pm, pn), members, _ = out[-1]
            pm, pn, count = max(pm, m), max(pn, n), len(members) + 1
            own = sum(a * b for a, b in members) + m * n
            if count * pm * pn <= budget and count * pm * pn <= waste * own + slack:
                out[-1] = ((pm, pn), [*members, (m, n)], r)
                continue
        out.append(((m, n), [(m, n)], r))
    return out


def merged(lists: dict, layout: str, out: list[str]) -> None:
    """Compute alone on the layout's batches as formed now, then on :func:`merged_shapes`' padded batches
    (each module's ΔW copied into the corner of a zeroed batch on the device, inside the clock)."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    _work(_delta(2, 256, 128, gen), 8, ["w0", "w1"])
    rows = []
    now = [((m, n), [(m, n)] * b, r) for (m, n), b, r in lists[layout]]
    ways = (("as formed now", now), ("merged, waste 1.5", merged_shapes(lists[layout])),
            ("merged, waste 2", merged_shapes(lists[layout], waste=2.0, slack=16 << 20)))
    for name, plan in [*ways, *ways]:  # twice: the first round also grows the allocator's pool
        total, pad = 0.0, 0
        for (pm, pn), members, rank in plan:
            parts = [_delta(1, m, n, gen)[0] for m, n in members]
            names = [f"{layout}.{i}.{total}" for i in range(len(members))]

            def work(parts=parts, names=names, pm=pm, pn=pn, rank=rank):
                if all(p.shape == (pm, pn) for p in parts):
                    d = torch.stack(parts)
                else:
                    d = torch.zeros(len(parts), pm, pn, device=DEV)
                    for i, p in enumerate(parts):
                        d[i, :p.shape[0], :p.shape[1]].copy_(p)
                _work(d, rank, names)
            total += _sync_time(work)
            pad += len(members) * pm * pn
            del parts
        own = sum(m * n for _, members, _ in plan for m, n in members)
        rows.append(f"| {name} | {len(plan)} | {pad / own:.3f} | {total:.3f} |")
    out.append(f"\n### compute alone, {layout}: batches as formed now against shapes merged by padding\n")
    out += ["| batches | count | padded / own elements | s |", "| --- | --- | --- | --- |", *rows]
    print("\n".join(out[-len(rows) - 3:]), flush=True)


def profiled(lists: dict, layout: str, out: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device=DEV).manual_seed(1)
    deltas = [(_delta(b, m, n, gen), rank, [f"p{m}x{n}.{i}.{j}" for i in range(b)])
              for j, ((m, n), b, rank) in enumerate(lists[layout][:60])]
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for d, rank, names in deltas:
            _work(d, rank, names)
        _sync()
    ka = prof.key_averages()
    out.append(f"\n### profiler, {layout}, first 60 batches: top ops by GPU time\n\n```")
    out.append(ka.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=48))
    out.append("```\n\nby host time\n\n```")
    out.append(ka.table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=48))
    out.append("```")
    print("\n".join(out[-5:]), flush=True)


def small_svd(lists: dict, layout: str, out: list[str], quick: bool = False) -> None:
    """The ℓ×ℓ core SVD of every batch, by driver (``quick``: the default driver and gesvda only)."""
    from loratool.linalg.randomized import _core_svd_batched

    shapes = []
    for (m, n), b, rank in lists[layout]:
        ell = min(2 * rank, m, n)
        if 2 * ell >= min(m, n):
            continue  # the exact path
        shapes.append((b, ell))
    gen = torch.Generator(device=DEV).manual_seed(2)
    cores = [torch.randn(b, e, e, device=DEV, generator=gen) for b, e in shapes]

    def run(fn) -> float:
        fn(cores[0])
        return _sync_time(lambda: [fn(c) for c in cores])

    rows = {
        "linalg.svd (default driver)": lambda c: torch.linalg.svd(c, full_matrices=False),
        **({} if quick else {
            "linalg.svd gesvd": lambda c: torch.linalg.svd(c, full_matrices=False, driver="gesvd"),
            "linalg.svd gesvdj": lambda c: torch.linalg.svd(c, full_matrices=False, driver="gesvdj")}),
        "linalg.svd gesvda": lambda c: torch.linalg.svd(c, full_matrices=False, driver="gesvda"),
        "linalg.svd gesvda, float64": lambda c: torch.linalg.svd(c.double(), full_matrices=False, driver="gesvda"),
        "the library's: gesvda float64 + its check": lambda c: _core_svd_batched(c, []),
        **({} if quick else {
            "on the CPU (copy there and back)": lambda c: [x.to(DEV) for x in torch.linalg.svd(c.cpu(), full_matrices=False)],
            "eigh of the fp64 Gram (on the GPU)": lambda c: torch.linalg.eigh(c.double().mT @ c.double()),
            "eigh of the fp32 Gram (on the GPU)": lambda c: torch.linalg.eigh(c.mT @ c)}),
    }
    out.append(f"\n### the small SVD: {layout}, {len(cores)} batches of [b, ℓ, ℓ], ℓ = {shapes[0][1]}\n")
    out.append("| how | s (all batches) |")
    out.append("| --- | --- |")
    for name, fn in rows.items():
        try:
            out.append(f"| {name} | {run(fn):.3f} |")
        except Exception as exc:  # a driver this build lacks
            out.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} |")
    print("\n".join(out[-10:]), flush=True)


def orth(lists: dict, layout: str, out: list[str]) -> None:
    from loratool.linalg.randomized import _cholesky_qr

    def inv_variant(y: torch.Tensor) -> torch.Tensor:
        q = y.double()
        for _ in range(2):
            chol = torch.linalg.cholesky_ex(q.mT @ q)[0]
            eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(chol)
            q = q @ torch.linalg.solve_triangular(chol, eye, upper=False).mT
        return q.float()

    gen = torch.Generator(device=DEV).manual_seed(3)
    ys = []
    for (m, n), b, rank in lists[layout]:
        ell = min(2 * rank, m, n)
        if 2 * ell < min(m, n):
            ys.append(torch.randn(b, max(m, n), ell, device=DEV, generator=gen))
    rows = {"CholeskyQR2 (fp64, triangular solve) as now": lambda y: _cholesky_qr(y),
            "CholeskyQR2, inverse factor times y": inv_variant,
            "Householder linalg.qr (fp32)": lambda y: torch.linalg.qr(y),
            "fp64 Gram matmul alone (×2)": lambda y: [(y.double().mT @ y.double()) for _ in range(2)]}
    out.append(f"\n### orthonormalising the sketches: {layout}, {len(ys)} batches, each ×(2·niter+2) in a call\n")
    out.append("| how | s (each batch once) |")
    out.append("| --- | --- |")
    for name, fn in rows.items():
        fn(ys[0])
        out.append(f"| {name} | {_sync_time(lambda fn=fn: [fn(y) for y in ys]):.3f} |")
    print("\n".join(out[-7:]), flush=True)


def in_process(keyshapes: Path, workdir: Path, out: list[str], layout: str = "sdxl") -> None:
    from extract_pairs import write_pair
    from torch.profiler import ProfilerActivity, profile

    from loratool.ops.extract import extract
    from loratool.ops.extract_batch import extract_batch
    from loratool.ops.extract_plan import build_plan, open_pair
    from loratool.ops.extract_stream import StageClock, stream_pairs

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, tuned = write_pair(layout, workdir, keyshapes, DEV)
    out.append(f"\n### in process: {layout} pair written in {time.perf_counter() - t0:.0f} s\n")
    rank, targets = JOBS.get(layout, (32, "attn"))
    opts = _options(rank, targets)
    for i in range(2):
        t0 = time.perf_counter()
        res = extract(base, tuned, opts)
        out.append(f"- extract() run {i + 1}: {time.perf_counter() - t0:.2f} s, stages {res.profile}")
    per_shape: dict[tuple, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    clock = StageClock()
    with open_pair(base, tuned) as (b, t):
        plan = build_plan(b, t, opts)
        for pair in stream_pairs(b, t, plan.modules, torch.device(DEV), clock):
            shape, n = pair.modules[0].matrix_shape, len(pair.modules)
            t0 = time.perf_counter()
            extract_batch(pair, opts, torch.float16)
            _sync()
            row = per_shape[shape]
            row[0] += 1
            row[1] += n
            row[2] += time.perf_counter() - t0
    out.append(f"- synchronised per batch: stages {clock.as_dict()}\n")
    out.append("| shape | batches | modules | compute s |")
    out.append("| --- | --- | --- | --- |")
    for shape, (nb, nm, s) in sorted(per_shape.items(), key=lambda kv: -kv[1][2])[:14]:
        out.append(f"| {shape[0]}×{shape[1]} | {nb} | {nm} | {s:.3f} |")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        extract(base, tuned, opts)
        _sync()
    out.append(f"\n{gpu_busy(prof)}")
    ka = prof.key_averages()
    out.append("\nunder the profiler, top ops by host time:\n\n```")
    out.append(ka.table(sort_by="cpu_time_total", row_limit=28, max_name_column_width=56))
    out.append("```\n\nby GPU time:\n\n```")
    out.append(ka.table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=56))
    out.append("```")
    print("\n".join(out[-60:]), flush=True)


def gpu_busy(prof) -> str:
    """How much of the run the GPU computed: the union of its kernels' intervals (copies and memsets apart)
    against the span from the first kernel to the last, from a torch.profiler run with CUDA activity."""
    kernels, copies = [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start / 1e6, e.time_range.end / 1e6)
        (copies if e.name.startswith(("Memcpy", "Memset")) else kernels).append(span)
    if not kernels:
        return "GPU: no kernel events in the profile"
    busy, copying = _union_s(kernels), _union_s(copies)
    window = max(b for _, b in kernels) - min(a for a, _ in kernels)
    return (f"GPU busy computing {busy:.3f} s of the {window:.3f} s from the first kernel to the last "
            f"({100 * busy / window:.0f} %); copies and memsets {copying:.3f} s")


def _union_s(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if a > end:
            total += b - a
        elif b > end:
            total += b - end
        end = max(end, b)
    return total


STEPS = """
import time, json
t = [time.perf_counter()]
import torch; t.append(time.perf_counter())
torch.zeros(1, device="cuda"); torch.cuda.synchronize(); t.append(time.perf_counter())
a = torch.randn(64, 64, device="cuda"); (a @ a).sum().item(); t.append(time.perf_counter())
torch.linalg.cholesky_ex(a @ a.T + 64 * torch.eye(64, device="cuda"))[0].sum().item(); t.append(time.perf_counter())
torch.linalg.svd(a)[1].sum().item(); t.append(time.perf_counter())
torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True); t.append(time.perf_counter())
names = ["import torch", "CUDA context", "first matmul (cuBLAS)", "first Cholesky (cuSOLVER)", "first SVD", "pinned 1 MiB"]
print("STEPS " + json.dumps(dict(zip(names, [b - a for a, b in zip(t, t[1:])]))))
"""


WARM = """
import json, sys, threading, time
import torch
sys.path.insert(0, "bench/device")
from extract_profile import _delta, _work
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
from loratool.ops.extract_startup import warm_kernels
dev, gen, rows = torch.device("cuda"), torch.Generator("cuda").manual_seed(0), {}
deltas = [_delta(4, 640, 640, gen), _delta(4, 640, 640, gen), _delta(2, 1280, 5120, gen), _delta(2, 1280, 5120, gen)]
torch.cuda.synchronize()
t0 = time.perf_counter(); warm_kernels(dev); rows["warm_kernels (main thread)"] = time.perf_counter() - t0
def batch(name, delta):
    s = torch.cuda.Stream(dev)
    with torch.cuda.stream(s):
        t = time.perf_counter(); _work(delta, 64, [str(i) for i in range(len(delta))]); s.synchronize()
        rows[name] = time.perf_counter() - t
for i, d in enumerate(deltas):  # each on a fresh thread and stream, as the two workers are
    th = threading.Thread(target=batch, args=(f"batch {i + 1} {tuple(d.shape)} (new thread)", d)); th.start(); th.join()
batch("batch 1 again (main thread)", deltas[0])
print("WARM " + json.dumps(rows))
"""


WARM_WAYS = """
import json, sys, threading, time
import torch
sys.path.insert(0, "bench/device")
from extract_profile import _delta, _work
dev = torch.device("cuda")
torch.zeros(1, device=dev); torch.cuda.synchronize()
from loratool.ops.extract_startup import warm_kernels
rows, mode = {}, sys.argv[1]
def timed(name, fn):
    s = torch.cuda.Stream(dev)
    with torch.cuda.stream(s):
        t = time.perf_counter(); fn(); s.synchronize(); rows[name] = time.perf_counter() - t
def blas():
    a = torch.randn(2, 96, 48, device=dev)
    (a.mT @ a).sum(); torch.baddbmm(a, a, a.mT @ a, alpha=-1); (a.double().mT @ a.double()).sum()
    for dt in (torch.float16, torch.bfloat16):
        h = a.to(dt); (h.view(torch.int16) != h.view(torch.int16)).any(dim=1); h.float().sub_(a)
        torch.linalg.vector_norm(h, dim=(1, 2), dtype=torch.float32).double().square()
    torch.randn(96, 48, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
def linalg():
    a = torch.randn(2, 96, 48, device=dev, dtype=torch.float64); g = a.mT @ a
    c, info = torch.linalg.cholesky_ex(g); torch.linalg.solve_triangular(c, a.mT, upper=False)
    torch.linalg.svd(g, full_matrices=False, driver="gesvda")
t0 = time.perf_counter()
if mode == "one thread":  # the warm-up before 2026-12-07: both tiny batches one after the other, one thread
    from loratool.ops.extract_batch import extract_batch
    from loratool.ops.extract_plan import ExtractOptions
    from loratool.ops.extract_startup import WARM_RANK, warm_up_batches
    timed("both batches", lambda: [extract_batch(p, ExtractOptions(rank=WARM_RANK), p.base.dtype)
                                   for p in warm_up_batches(dev)])
elif mode == "firsts one after the other":
    timed("cuBLAS and elementwise firsts", blas)
    timed("cuSOLVER firsts", linalg)
    timed("warm_kernels after those", lambda: warm_kernels(dev))
elif mode == "firsts on two threads":
    ths = [threading.Thread(target=timed, args=(n, f)) for n, f in (("cuBLAS and elementwise firsts (thread)", blas),
                                                                   ("cuSOLVER firsts (thread)", linalg))]
    [t.start() for t in ths]; [t.join() for t in ths]
    timed("warm_kernels after those", lambda: warm_kernels(dev))
else:  # the library's
    timed("warm_kernels", lambda: warm_kernels(dev))
rows["warm-up in all"] = time.perf_counter() - t0
d = _delta(4, 640, 640, torch.Generator("cuda").manual_seed(0)); torch.cuda.synchronize()
th = threading.Thread(target=timed, args=("first batch after it (new thread)", lambda: _work(d, 64, list("abcd"))))
th.start(); th.join()
print("WARMWAYS " + json.dumps(rows))
"""


FIRST_PASS = """
import json, sys, time
import torch
sys.path.insert(0, "bench/device")
import extract_profile as ep
dev = torch.device("cuda")
torch.zeros(1, device=dev); torch.cuda.synchronize()
from loratool.ops.extract_startup import warm_kernels
warm_kernels(dev)
mode, lst = sys.argv[1], json.loads(open(sys.argv[2]).read())["sdxl"]
rows = {}
if mode == "reserve":  # one block the size of the run's peak, given back to the cache: later tensors split it
    t = time.perf_counter(); torch.empty(6 << 30, dtype=torch.uint8, device=dev); torch.cuda.synchronize()
    rows["reserve 6 GiB"] = time.perf_counter() - t
gen = torch.Generator(device=dev).manual_seed(0)
for rnd in (1, 2):
    total = 0.0
    for (m, n), b, rank in lst:
        d = ep._delta(b, m, n, gen)
        total += ep._sync_time(lambda d=d, b=b, rank=rank: ep._work(d, rank, [f"{rnd}.{total}.{i}" for i in range(b)]))
        del d
    rows[f"pass {rnd}"] = total
print("FIRST " + json.dumps(rows))
"""


def _fresh(script: str, tag: str, argv: list[str], repeat: int) -> dict[str, list[float]]:
    """``script`` run ``repeat`` times in fresh interpreters (the repository importable); each prints
    ``TAG {json}`` of seconds by name: every name's values, one per run."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}:{os.environ.get('PYTHONPATH', '')}"}
    rows: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env, cwd=repo)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-800:])
        for k, v in json.loads(proc.stdout.split(f"{tag} ", 1)[1]).items():
            rows[k].append(v)
    return rows


def first_pass(batches: Path, out: list[str], repeat: int = 2) -> None:
    """SDXL's batches computed twice in fresh interpreters (warm-up done first): how much more the first
    pass costs, with and without one block of the run's peak size reserved and given back to the cache."""
    out += ["\n### compute alone, first pass against second (fresh interpreters, warm-up done first)\n",
            "| mode | what | s (each interpreter) |", "| --- | --- | --- |"]
    for mode in ("plain", "reserve"):
        rows = _fresh(FIRST_PASS, "FIRST", [mode, str(batches.resolve())], repeat)
        out += [f"| {mode} | {k} | {', '.join(f'{x:.3f}' for x in v)} |" for k, v in rows.items()]
    print("\n".join(out[-8:]), flush=True)


def warm_ways(out: list[str], repeat: int = 3) -> None:
    """The kernel warm-up four ways, in fresh interpreters (CUDA context made first): both tiny batches on
    one thread (before 2026-12-07); the first cuBLAS/elementwise and cuSOLVER calls one after the other,
    then the library's warm-up; the same two on two threads at once (does loading overlap?), then the
    library's; the library's alone (two rounds of two threads)."""
    import statistics

    out.append(f"\n### the warm-up four ways (median of {repeat} fresh interpreters each; all runs)\n")
    out += ["| way | step | s (median) | all |", "| --- | --- | --- | --- |"]
    for mode in ("one thread", "firsts one after the other", "firsts on two threads", "library"):
        rows = _fresh(WARM_WAYS, "WARMWAYS", [mode], repeat)
        out += [f"| {mode} | {k} | {statistics.median(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} |"
                for k, v in rows.items()]
    print("\n".join(out[-18:]), flush=True)


def warm(out: list[str], repeat: int = 3) -> None:
    """Fresh interpreters, CUDA context made first (as the bench's contenders do): the kernel warm-up, then
    the first batches of real work after it, each on a fresh thread and stream (what is still loaded late)."""
    import statistics

    rows = _fresh(WARM, "WARM", [], repeat)
    out.append(f"\n### kernel warm-up and the first batches after it (median of {repeat} fresh interpreters)\n")
    out.append("| what | s (median) | all |")
    out.append("| --- | --- | --- |")
    out += [f"| {k} | {statistics.median(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} |" for k, v in rows.items()]
    print("\n".join(out[-len(rows) - 3:]), flush=True)


def startup(out: list[str], repeat: int = 3) -> None:
    """Fresh interpreters: bare python, the steps of a CUDA start one by one, and the whole command on the
    bundled tiny pair (its report's start-up and command seconds beside the wall time seen from outside)."""
    import statistics
    import subprocess
    import tempfile

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}:{os.environ.get('PYTHONPATH', '')}"}

    def wall(cmd: list[str]) -> tuple[float, str]:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-800:])
        return time.perf_counter() - t0, proc.stdout

    rows: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            rows["python -c pass"].append(wall([sys.executable, "-c", "pass"])[0])
            rows["python -c 'import torch'"].append(wall([sys.executable, "-c", "import torch"])[0])
            w, text = wall([sys.executable, "-c", STEPS])
            rows["the steps below, one interpreter"].append(w)
            for k, v in json.loads(text.split("STEPS ", 1)[1]).items():
                rows[f"  {k}"].append(v)
            report = Path(tmp) / "r.json"
            w, _ = wall([sys.executable, "-m", "loratool", "extract", "fixtures/tiny_base.safetensors",
                         "fixtures/tiny_tuned.safetensors", "-r", "8", "--device", "cuda", "-o", f"{tmp}/x",
                         "--force", "-q", "--report", str(report)])
            prof = json.loads(report.read_text())["profile"]
            rows["extract tiny pair: whole command (outside)"].append(w)
            for k in ("startup_s", "plan_s", "compute_s", "write_s", "command_s"):
                if k in prof:
                    rows[f"  report {k}"].append(prof[k])
            rows["  outside − command_s (interpreter, imports, exit)"].append(w - prof["command_s"])
    out.append(f"\n### start-up on the GPU host (median of {repeat} fresh interpreters)\n")
    out.append("| what | s |")
    out.append("| --- | --- |")
    out += [f"| {k} | {statistics.median(v):.3f} |" for k, v in rows.items()]
    print("\n".join(out[-len(rows) - 3:]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-batches", type=Path)
    p.add_argument("--batches", type=Path)
    p.add_argument("--keyshapes", type=Path, default=Path("keyshapes"))
    p.add_argument("--layouts", default="sdxl,flux,sd3")
    p.add_argument("--parts", default="startup,compute,profile,svd,orth,inprocess")
    p.add_argument("--workdir", type=Path, default=Path("/root/extract-profile"))
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="the small SVD: the default driver and gesvda only")
    p.add_argument("--repeat", type=int, default=3, help="start-up: fresh interpreters per row")
    p.add_argument("--pair", default="sdxl", help="the layout written for the in-process part")
    p.add_argument("--limit", type=int, default=0, help="at most this many batches a layout (a smoke test)")
    args = p.parse_args()
    if args.make_batches:
        make_batches(args.make_batches, args.keyshapes)
        return
    lists = json.loads(args.batches.read_text())
    parts = args.parts.split(",")
    global DEV
    DEV = args.device
    if args.limit:
        lists = {k: v[:args.limit] for k, v in lists.items()}
    name = torch.cuda.get_device_name(0) if DEV == "cuda" else "CPU"
    out = [f"# extract on {name}, torch {torch.__version__}\n"]
    steps = {"startup": lambda: startup(out, args.repeat), "warm": lambda: warm(out, args.repeat),
             "compute": lambda: compute_alone(lists, args.layouts.split(","), out),
             "profile": lambda: profiled(lists, "sdxl", out),
             "merged": lambda: merged(lists, "sdxl", out), "warmways": lambda: warm_ways(out, args.repeat),
             "firstpass": lambda: first_pass(args.batches, out),
             "svd": lambda: small_svd(lists, "sdxl", out, args.quick),
             "orth": lambda: orth(lists, "sdxl", out),
             "inprocess": lambda: in_process(args.keyshapes, args.workdir, out, args.pair)}
    for part in parts:
        try:
            steps[part]()
        except Exception as exc:  # keep what the other parts measured
            out.append(f"\n{part} failed: {type(exc).__name__}: {exc}")
            print(out[-1], flush=True)
        (args.out / "extract_profile.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
