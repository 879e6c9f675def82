"""Benchmark: an extraction's start on a cold page cache, with and without telling the OS what it will read.

The command plans from the headers, then waits for torch (and the device) before its readers start; on a
cold cache the disk idles meanwhile unless the OS has been told which bytes come next (``plan_extract(...,
advise=True)``: ``posix_fadvise(WILLNEED)`` of the plan's weights). Each row is a fresh interpreter that
does what the command does up to the last byte read, and no math:

1. ``import torch`` started on a thread (on CUDA with the context and the kernel warm-up), as the command
   does (``extract_startup.start_device``), while the headers are planned, with or without the hint;
2. once torch is ready, loratool's reader (``stream_pairs``, the same threads, slots and copies as an extraction, without the
   copy stream's comparison) over every planned weight of both files.

It reports when torch was ready and when the last byte was read, counted from the interpreter's start.
Before every cold row the page cache is dropped (``/proc/sys/vm/drop_caches``: root on Linux; the script
refuses to run without it): "all cold" leaves it so (torch's own files too, as after a reboot), "models
cold" imports torch once in another process first (its files cached, the models not: a user's usual first
extraction of newly downloaded models). The four kinds of row alternate. One warm row (the pair just
read) gives the floor the disk adds to.

    python bench/cold_start.py --layout sd1 --repeat 3 [--device cpu|cuda] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

ROW = """
import time, sys, json
t0 = time.perf_counter()
from loratool.ops.extract_plan import ExtractOptions, open_pair, plan_extract
from loratool.ops.extract_startup import start_device
base, tuned, device, hint, rank, targets = sys.argv[1:7]

def resolve():
    import torch
    return torch.device(device)

ready = start_device(resolve)  # torch loads (and on CUDA the device starts) while the headers are planned
opts = ExtractOptions(rank=int(rank), targets=targets, device=device)
plan = plan_extract(base, tuned, opts, advise=hint == "1")
planned = time.perf_counter() - t0
dev = ready.result()
torch_ready = time.perf_counter() - t0
import torch
from loratool.ops.extract_stream import stream_pairs
n = 0
with open_pair(base, tuned) as (b, t):
    for pair in stream_pairs(b, t, plan.modules, dev, flags=False):
        if pair.ready is not None:
            pair.ready.synchronize()
        n += sum(x.numel() * x.element_size() for x in (pair.base, pair.tuned))
print("ROW " + json.dumps({"plan_s": planned, "torch_ready_s": torch_ready, "last_byte_s": time.perf_counter() - t0,
                           "gib": n / 2**30}))
"""


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        raise SystemExit(f"cold_start: cannot drop the page cache ({e.strerror}): run as root on Linux") from None


def row(base: Path, tuned: Path, args, hint: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", ROW, str(base), str(tuned), args.device, "1" if hint else "0",
                          str(args.rank), args.targets], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.split("ROW ", 1)[1])


def main() -> None:
    from extract_pairs import LAYOUTS, nbytes, write_pair

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", choices=LAYOUTS, default="sd1")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--targets", default="transformer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keyshapes", default=str(REPO.parent / "shared" / "fixtures" / "real" / "keyshapes"))
    args = p.parse_args()
    drop_caches()  # refuse early where the cache cannot be dropped
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        base, tuned = write_pair(args.layout, Path(tmp), Path(args.keyshapes), "cpu")
        size = (nbytes(base) + nbytes(tuned)) / 2**30
        print(f"pair {size:.2f} GiB written in {time.perf_counter() - t0:.0f} s", flush=True)
        rows: dict[str, list[dict]] = {f"{cold}, {hint}": [] for cold in ("all cold", "models cold")
                                       for hint in ("advised", "not advised")}
        for _ in range(args.repeat):
            for name in rows:
                drop_caches()
                if name.startswith("models"):  # torch's own files back in the cache: a user's usual first run
                    subprocess.run([sys.executable, "-c", "import torch"], check=True)
                rows[name].append(row(base, tuned, args, hint=name.endswith(", advised")))
                print(name, rows[name][-1], flush=True)
        warm: dict[str, list[dict]] = {"warm, advised": [], "warm, not advised": []}
        for _ in range(args.repeat):
            for name in warm:
                warm[name].append(row(base, tuned, args, hint=name.endswith(", advised")))
    import torch

    print(f"\n{args.layout} rank {args.rank} --targets {args.targets}, reader on {args.device}; pair {size:.2f} GiB "
          f"({warm['warm, advised'][0]['gib']:.2f} GiB read); torch {torch.__version__}; {os.cpu_count()} cores; median of "
          f"{args.repeat} fresh interpreters each, cold rows after dropping the page cache, alternating\n")
    print("| page cache | plan s | torch ready s | last byte read s (all runs) |")
    print("| --- | --- | --- | --- |")
    for name, runs in {**rows, **warm}.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("plan_s", "torch_ready_s", "last_byte_s")}
        every = ", ".join(f"{r['last_byte_s']:.2f}" for r in runs)
        print(f"| {name} | {med['plan_s']:.2f} | {med['torch_ready_s']:.2f} | {med['last_byte_s']:.2f} "
              f"({every}) |")


if __name__ == "__main__":
    main()
