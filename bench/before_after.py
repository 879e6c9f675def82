"""Benchmark: the same commands under a git revision's tree and this checkout's, in one run (issue 13: the
structural rework must be no slower than what it replaced).

Inputs (random values in real key layouts, written once under ``--workdir``): an SDXL kohya LoRA at rank
``--rank`` (keyshapes/sdxl_kohya_lora_r32.json, bench/convert.py's builder) and a full-size SD1.5
base/tuned pair (bench/extract_pairs.py). Each command runs in a fresh interpreter (``python -m
loratool …``, the tree on PYTHONPATH), before and after interleaved so that machine load falls on both
alike; the table shows the fastest of ``--repeat`` runs (extract and merge: of ``--repeat-long``). Every
output goes to a new path and is removed after the run. Both trees run from bytecode, as installed copies
do, and the after tree's family tables are cached (``loratool/arch/cache.py``) by an untimed first run.

    python -P bench/before_after.py --before cebdfcf [--rank 64] [--repeat 3] [--repeat-long 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "bench"))  # appended: no bench script shadows a stdlib module

from convert import KEYSHAPES, make_input  # noqa: E402
from extract_pairs import write_pair  # noqa: E402
from revision import compiled, export_tree, timed  # noqa: E402


def commands(lora: Path, base: Path, tuned: Path, extracted: Path) -> list[tuple[str, list[str], bool]]:
    """(label, arguments with OUT for the output path, long); the extract's output feeds the merge."""
    return [
        ("inspect LORA", ["inspect", str(lora)], False),
        ("convert LORA --to diffusers", ["convert", str(lora), "--to", "diffusers", "-o", "OUT"], False),
        ("scale LORA 0.5", ["scale", str(lora), "0.5", "-o", "OUT"], False),
        ("resize LORA -r 16", ["resize", str(lora), "-r", "16", "-o", "OUT"], False),
        ("mix LORA:0.5 LORA:0.5", ["mix", f"{lora}:0.5", f"{lora}:0.5", "-o", "OUT"], False),
        ("extract SD1.5 pair -r 32 (CPU)", ["extract", str(base), str(tuned), "-r", "32", "--device", "cpu",
                                            "-o", "OUT"], True),
        ("merge SD1.5 + extracted LoRA", ["merge", str(base), str(extracted), "-o", "OUT"], True),
    ]


def run(args: list[str], root: Path, out: Path) -> float:
    return timed([sys.executable, "-m", "loratool", *[str(out) if a == "OUT" else a for a in args]], root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="the git revision to time beside this checkout")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--repeat-long", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        trees = [(f"before ({args.before})", export_tree(args.before, work / "before")), ("after", compiled(REPO))]
        os.environ["LORATOOL_CACHE_DIR"] = str(work / "cache")  # the after tree's built tables (arch/cache.py),
        # stored by the first run below, as a user's are by their first command
        lora = work / f"sdxl_kohya_r{args.rank}.safetensors"
        size = make_input(lora, args.rank)
        base, tuned = write_pair("sd1", work, KEYSHAPES, "cpu")
        extracted = work / "extracted.safetensors"
        run(["extract", str(base), str(tuned), "-r", "32", "--device", "cpu", "-o", "OUT"], REPO, extracted)
        best: dict[tuple[str, str], float] = {}
        todo = commands(lora, base, tuned, extracted)
        for label, argv, long in todo:
            for i in range(args.repeat_long if long else args.repeat):
                for name, root in trees:
                    out = work / f"out-{i}-{name.split()[0]}.safetensors"
                    wall = run(argv, root, out)
                    best[label, name] = min(wall, best.get((label, name), float("inf")))
                    if out.is_dir():
                        shutil.rmtree(out)
                    else:
                        out.unlink(missing_ok=True)
            print(f"{label}: done", file=sys.stderr, flush=True)
        print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f} at the end; LoRA {size / 2**20:.0f} MiB (SDXL kohya, rank {args.rank}); "
              f"SD1.5 pair {(base.stat().st_size + tuned.stat().st_size) / 2**30:.2f} GiB\n")
        names = [n for n, _ in trees]
        print("| command | " + " | ".join(f"{n} s" for n in names) + " | after ÷ before |")
        print("|---|" + "---|" * (len(names) + 1))
        for label, _, _ in todo:
            b, a = best[label, names[0]], best[label, names[1]]
            print(f"| {label} | {b:.2f} | {a:.2f} | {a / b:.2f}× |")


if __name__ == "__main__":
    main()
