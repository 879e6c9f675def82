"""Benchmark: `loratool inspect` on a large SDXL LoRA, beside a plain header read.

Builds a kohya SDXL LoRA with the key layout and shapes of
../shared/fixtures/real/keyshapes/sdxl_kohya_lora_r32.json at rank 256 (fp16, random values,
a correct sshs_model_hash) in a temporary folder, times each way of reading it, prints one table
and removes the file. The page cache is warm (the file was just written), which is the usual
case for a file inspected right after download or training.

    python bench/inspect_speed.py [--rank 256] [--repeat 3]

Target (issue 2): inspect without --modules under 1 s on the 2-core CI machine.
"""

from __future__ import annotations

import os
import sys

# this file is named like the stdlib module `inspect`: run as a script, its folder comes first on
# sys.path and would shadow it for every library that imports inspect (torch does)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYSHAPES = REPO.parent / "shared" / "fixtures" / "real" / "keyshapes" / "sdxl_kohya_lora_r32.json"


def build(path: Path, rank: int) -> tuple[int, int]:
    """Write the file; returns (tensors, bytes)."""
    from loratool.io.metadata import finalize_metadata
    from loratool.io.writer import write_safetensors

    shapes = json.loads(KEYSHAPES.read_text())
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in shapes.items():
        shape = list(entry["shape"])
        if key.endswith("lora_down.weight"):
            shape[0] = rank
        elif key.endswith("lora_up.weight"):
            shape[1] = rank
        if key.endswith(".alpha"):
            tensors[key] = torch.tensor(float(rank)).half()
        else:
            tensors[key] = torch.empty(shape, dtype=torch.float16).normal_(0.0, 0.02, generator=g)
    meta = finalize_metadata(tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                       "ss_network_alpha": f"{float(rank)}", "ss_base_model_version": "sdxl_base_v1-0"})
    write_safetensors(path, tensors, meta)
    return len(tensors), path.stat().st_size


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def header_stdlib(path: Path) -> None:
    """The baseline: read 8 bytes, read the header, json.loads it. Nothing validated."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        json.loads(f.read(n))


def header_ours(path: Path) -> None:
    from loratool.io.safetensors import SafetensorsFile

    with SafetensorsFile(path) as f:
        f.keys()


def header_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        f.keys()
        f.metadata()


def run_cli(args: list[str]) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not KEYSHAPES.is_file():
        sys.exit(f"bench/inspect_speed.py needs {KEYSHAPES} (../shared is absent)")

    from loratool.ops.inspect import HASH_AUTO_LIMIT, inspect_file

    with tempfile.TemporaryDirectory(prefix="loratool-bench-") as tmp:
        path = Path(tmp) / f"sdxl_kohya_r{args.rank}.safetensors"
        t0 = time.perf_counter()
        n_tensors, size = build(path, args.rank)
        print(f"built {path.name}: {n_tensors} tensors, {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s")
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.repeat} runs each, warm page cache\n")
        py = sys.executable
        auto_hash = size <= HASH_AUTO_LIMIT
        rows = [  # (label, function, runs)
            ("header: 8 bytes + json.loads (stdlib, baseline)", lambda: header_stdlib(path), args.repeat),
            ("header: safetensors.safe_open keys+metadata", lambda: header_safetensors(path), args.repeat),
            ("header: loratool SafetensorsFile (validated)", lambda: header_ours(path), args.repeat),
            (f"inspect in-process (default: hash {'checked' if auto_hash else 'not checked, > 256 MiB'})",
             lambda: inspect_file(path), args.repeat),
            (f"inspect in-process --hash (SHA-256 of {size / 1e9:.2f} GB)", lambda: inspect_file(path, check_hash=True),
             args.repeat),
            ("inspect in-process --no-hash", lambda: inspect_file(path, check_hash=False), args.repeat),
            ("inspect in-process --modules (‖ΔW‖ of every module)", lambda: inspect_file(path, modules=True), 1),
            ("subprocess: python -c 'import torch'", lambda: run_cli([py, "-c", "import torch"]), args.repeat),
            ("subprocess: python header read (no torch)",
             lambda: run_cli([py, "-c", f"import json;f=open({str(path)!r},'rb');"
                                        "json.loads(f.read(int.from_bytes(f.read(8),'little')))"]), args.repeat),
            ("subprocess: loratool inspect --json",
             lambda: run_cli([py, "-m", "loratool", "inspect", "--json", str(path)]), args.repeat),
        ]
        rep = inspect_file(path, check_hash=True)
        assert rep["modules"] == n_tensors // 3 and rep["ranks"] == [args.rank] and rep["hash_ok"] is True
        print(f"load average before timing: {os.getloadavg()[0]:.1f}")
        print(f"{'what':<60} {'runs':>4} {'min s':>8} {'median s':>9}")
        print("-" * 84)
        for label, fn, runs in rows:
            times = timed(fn, runs)
            print(f"{label:<60} {runs:>4} {min(times):>8.3f} {statistics.median(times):>9.3f}")
        print(f"\ninspect: {rep['modules']} modules, {rep['params']:,} parameters, ratio {rep['reduction_ratio']:.2f}")


if __name__ == "__main__":
    main()
