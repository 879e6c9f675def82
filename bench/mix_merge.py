"""Benchmarks for ``mix --mode svd`` and ``merge`` (prints tables: ours beside the baseline, one run).

1. Two SDXL LoRAs at rank 64 (key shapes of a real kohya SDXL LoRA, rank raised to 64, random values)
   mixed by svd to rank 64: loratool's factored path (QR of the stacked factors, SVD of the 128×128
   core) vs the usual densify-the-sum + full SVD (kohya svd_merge_lora / peft "svd", without their
   quantile clamp). Time and the relative Frobenius error against the exact sum, per path.
2. An SD1.5 LoRA (real kohya r128 key shapes, random values) merged into a full-size random SD1.5
   checkpoint (real LDM key shapes, float tensors stored fp16): wall time and peak RSS of a
   ``loratool merge`` process vs a plain file copy of the same checkpoint (``cp``).

    python bench/mix_merge.py [--stride N] [--threads T] [--workdir DIR] [--skip-mix] [--skip-merge]

(``-P``: keep bench/ off sys.path, where other benchmark scripts' names can shadow stdlib modules.)

``--stride N`` runs the dense baseline on every N-th module only (and the factored path on the same
modules, for a like-for-like table; the factored path is also timed on all modules). Files are
written under --workdir (default: a temporary folder) and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KEYSHAPES = REPO.parent / "shared" / "fixtures" / "real" / "keyshapes"
DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int64": torch.int64,
      "int32": torch.int32}


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def random_kohya(shapes: dict, rank_from: int, rank_to: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, info in sorted(shapes.items()):
        shape = [rank_to if s == rank_from and ("lora_down" in key and i == 0 or "lora_up" in key and i == 1) else s
                 for i, s in enumerate(info["shape"])]
        if key.endswith(".alpha"):
            out[key] = torch.tensor(float(rank_to) / 2)
        else:
            out[key] = torch.randn(*shape, generator=g) * (0.02 if "lora_up" in key else 0.1)
    return out


def _dense_svd(items, key: str, rank: int) -> tuple[torch.Tensor, float]:
    """The baseline: densify Σ w·ΔW, full SVD, truncate."""
    total = None
    for item in items:
        m = item.adapter.modules.get(key)
        if m is None:
            continue
        d = item.weight * m.delta(torch.float32)
        total = d if total is None else total + d
    flat = total.reshape(total.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = min(rank, s.shape[0])
    tail = float(s[k:].double().square().sum().sqrt() / s.double().square().sum().sqrt())
    return (u[:, :k] * s[:k]) @ vh[:k], tail


def bench_mix(stride: int) -> list[str]:
    from loratool.core.modules import Adapter
    from loratool.formats import decode
    from loratool.ops.mix import MixInput, mix

    shapes = json.loads((KEYSHAPES / "sdxl_kohya_lora_r32.json").read_text())
    items = [MixInput(decode(random_kohya(shapes, 32, 64, seed)), w, name=f"lora{seed}")
             for seed, w in ((1, 0.7), (2, 0.5))]
    keys = sorted(items[0].adapter.modules)
    subset = keys[::stride]
    sub_items = [MixInput(Adapter(modules={k: i.adapter.modules[k] for k in subset},
                                  base_model=i.adapter.base_model), i.weight, name=i.name) for i in items]
    t0 = time.perf_counter()
    full = mix(items, mode="svd", rank=64)
    t_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = mix(sub_items, mode="svd", rank=64)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_err, diffs = [], []
    for key in subset:
        best, err = _dense_svd(sub_items, key, 64)
        base_err.append(err)
        mine = ours.adapter.modules[key].delta(torch.float32).reshape(best.shape)
        diffs.append(float((mine - best).norm() / best.norm()))
    t_dense = time.perf_counter() - t0
    our_err = {r.key: r.rel_error for r in ours.modules}
    worst_gap = max(abs(our_err[k] - e) for k, e in zip(subset, base_err, strict=True))
    mean = sum(base_err) / len(base_err)
    return [
        f"modules: {len(keys)} (both LoRAs rank 64, weights 0.7/0.5; every {stride}-th module in the comparison: "
        f"{len(subset)})",
        "| path | modules | time (s) | mean rel. error | speed-up |",
        "|---|---|---|---|---|",
        f"| densify + full SVD (baseline) | {len(subset)} | {t_dense:.2f} | {mean:.6f} | 1× |",
        f"| factored (QR + core SVD, loratool) | {len(subset)} | {t_ours:.2f} | "
        f"{sum(our_err[k] for k in subset) / len(subset):.6f} | {t_dense / t_ours:.1f}× |",
        f"| factored, all modules | {len(keys)} | {t_all:.2f} | "
        f"{sum(r.rel_error for r in full.modules) / len(full.modules):.6f} | — |",
        f"largest |error(ours) − error(baseline)| over the modules: {worst_gap:.2e}; largest relative difference "
        f"between the two rank-64 results: {max(diffs):.2e}",
    ]


def write_random_checkpoint(path: Path, shapes: dict) -> int:
    """A full-size checkpoint with random values, written tensor by tensor (float tensors as fp16)."""
    from loratool.io.writer import header_bytes, reference_order, tensor_bytes

    entries = {}
    for key, info in shapes.items():
        dtype = torch.float16 if DT[info["dtype"]].is_floating_point else DT[info["dtype"]]
        name = {torch.float16: "F16", torch.int64: "I64", torch.int32: "I32"}[dtype]
        entries[key] = (name, dtype, tuple(info["shape"]))
    order = reference_order((k, e[0]) for k, e in entries.items())
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as fh:
        fh.write(header_bytes([(k, entries[k][0], entries[k][2], math.prod(entries[k][2])
                                * torch.empty(0, dtype=entries[k][1]).element_size()) for k in order], {}))
        for k in order:
            _, dtype, shape = entries[k]
            t = (torch.randn(shape, generator=g) * 0.02).to(dtype) if dtype.is_floating_point \
                else torch.zeros(shape, dtype=dtype)
            fh.write(tensor_bytes(t))
    return path.stat().st_size


def _hwm(pid: int) -> int:
    """VmHWM (peak resident set) of a running process in KiB, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a child process.

    The peak is the child's own VmHWM, polled every 20 ms (getrusage's maxrss of a child also counts
    the parent's pages it inherited before exec, which would charge this process's memory to it).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed with exit code {proc.returncode}")
    return wall, peak / 2**20


def bench_merge(work: Path) -> list[str]:
    from loratool.io.writer import write_safetensors

    ckpt = work / "sd15.safetensors"
    size = write_random_checkpoint(ckpt, json.loads((KEYSHAPES / "sd15_ldm_checkpoint_full.json").read_text()))
    lora = work / "lora.safetensors"
    lshapes = json.loads((KEYSHAPES / "sd15_kohya_lora_r128.json").read_text())
    write_safetensors(lora, {k: v.half() for k, v in random_kohya(lshapes, 128, 128, 3).items()})
    rows = []
    copy = work / "copy.safetensors"
    t_cp, rss_cp = _timed(["cp", str(ckpt), str(copy)])
    copy.unlink()
    out = work / "baked.safetensors"
    merge_cmd = [sys.executable, "-m", "loratool", "merge", str(ckpt), f"{lora}:0.8", "-o", str(out), "-q"]
    t_m, rss_m = _timed(merge_cmd)
    out.unlink()
    t_start, _ = _timed([sys.executable, "-c", "import loratool.cli.merge, loratool.ops.merge_stream, loratool.formats"])
    gib = size / 2**30
    rows += [
        f"checkpoint: {gib:.2f} GiB (fp16, {len(json.loads((KEYSHAPES / 'sd15_ldm_checkpoint_full.json').read_text()))}"
        f" tensors), LoRA: {len(lshapes) // 3} modules at rank 128 (fp16); page cache warm for both",
        "| run | wall (s) | throughput (GiB/s) | peak RSS (GiB) |",
        "|---|---|---|---|",
        f"| cp (baseline) | {t_cp:.2f} | {gib / t_cp:.2f} | {rss_cp:.3f} |",
        f"| loratool merge (whole process, incl. start-up and reading the LoRA) | {t_m:.2f} | {gib / t_m:.2f} | "
        f"{rss_m:.3f} |",
        f"| start-up alone (python + torch + loratool imports, no work) | {t_start:.2f} | — | — |",
        f"merge / cp time: {t_m / t_cp:.2f}× (without start-up: {(t_m - t_start) / t_cp:.2f}×)",
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-mix", action="store_true")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the mix benchmark")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"hardware: {hardware()}")
    if not args.skip_mix:
        print("\n## mix --mode svd: two SDXL LoRAs (rank 64) to rank 64")
        print("\n".join(bench_mix(args.stride)))
    if not args.skip_merge:
        work = Path(tempfile.mkdtemp(prefix="lt-bench-", dir=args.workdir))
        try:
            print("\n## merge: SD1.5 LoRA into a full-size SD1.5 checkpoint")
            print("\n".join(bench_merge(work)))
        finally:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
