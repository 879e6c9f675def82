"""Benchmark: ``convert`` of a ~1 GB SDXL kohya LoRA to diffusers, beside the I/O floor.

The input has the real SDXL kohya layout (keyshapes/sdxl_kohya_lora_r32.json: 2 text encoders +
SAI-named UNet) at rank 256 instead of 32, random values, fp16. The floor is what any conversion
must at least do: ``safetensors.torch.load_file`` + ``save_file`` of the same file. Ours is the
whole ``loratool convert`` path: read (lazy) → decide → encode → atomic write with hashes.

    python bench/convert.py [--rank 256] [--repeats 3] [--dir /tmp]

Prints one table (best of N wall-clock seconds, and ours / floor).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

KEYSHAPES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real" / "keyshapes"


def make_input(path: Path, rank: int) -> int:
    from safetensors.torch import save_file

    table = json.loads((KEYSHAPES / "sdxl_kohya_lora_r32.json").read_text())
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key, info in table.items():
        shape = list(info["shape"])
        if key.endswith("lora_down.weight"):
            shape[0] = rank
        elif key.endswith("lora_up.weight"):
            shape[1] = rank
        if key.endswith(".alpha"):
            tensors[key] = torch.tensor(float(rank) / 2, dtype=torch.float16)
        else:
            tensors[key] = (torch.randn(*shape, generator=gen) * 0.01).to(torch.float16)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})
    return path.stat().st_size


def floor(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    save_file(tensors, str(dst))


def floor_hashed(src: Path, dst: Path) -> None:
    """The floor plus what every file we write carries: a SHA-256 of the data (``sshs_model_hash``)
    and an fsync before the rename (atomic, durable output)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name].reshape(-1).contiguous().view(torch.uint8).numpy())
    save_file(tensors, str(dst), metadata={"sshs_model_hash": h.hexdigest()})
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_and_hash(src: Path, dst: Path) -> None:
    """No write at all: load + SHA-256 of the data, the lower bound of any output with a correct
    ``sshs_model_hash`` (SHA-256 is sequential: one core's throughput)."""
    import hashlib

    from safetensors.torch import load_file

    tensors = load_file(str(src))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name].reshape(-1).contiguous().view(torch.uint8).numpy())


def ours(src: Path, dst: Path) -> None:
    from loratool.formats import read_adapter, write_adapter
    from loratool.ops.convert import convert
    from loratool.ops.convert_meta import target_metadata

    adapter = read_adapter(src)
    result, report = convert(adapter, "diffusers")
    meta = target_metadata(adapter.metadata, result, report, parameters={"to": "diffusers"})
    write_adapter(result, dst, "diffusers", force=True, inputs=[src], metadata=meta)


def best_of(fn, src: Path, dst: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if dst.exists():
            dst.unlink()
        t0 = time.perf_counter()
        fn(src, dst)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    work = Path(args.dir) / f"loratool-bench-convert-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    src = work / "sdxl_kohya.safetensors"
    try:
        size = make_input(src, args.rank)
        rows = []
        for name, fn in (("safetensors load_file + save_file (floor)", floor),
                         ("load_file + SHA-256 of the data, no write", load_and_hash),
                         ("floor + SHA-256 of the data + fsync", floor_hashed),
                         ("loratool convert kohya → diffusers", ours)):
            rows.append((name, best_of(fn, src, work / "out.safetensors", args.repeats)))
        print(f"input: SDXL kohya LoRA, rank {args.rank}, fp16, {size / 2**30:.2f} GiB; best of {args.repeats}; "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs")
        print(f"{'what':<46} {'seconds':>8} {'× floor':>8}")
        for name, secs in rows:
            print(f"{name:<46} {secs:8.2f} {secs / rows[0][1]:8.2f}")
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
