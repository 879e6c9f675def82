"""Benchmark: ``loratool mix`` with a LyCORIS LoKr input, before and after the factored path (issue 15).

The "before" is the tree of ``--before`` (default: c1080d9, the commit before mix took LoHa/LoKr on their
exact factors), exported with ``git archive`` into a temporary folder; the "after" is this checkout. Each
runs the same whole command in a fresh interpreter (``python -m loratool mix …``), one after the other in
this one run:

1. the bundled SD1.5 LoKr (``shared/fixtures/real/adapters/sd15_kohya_lycoris_lokr_r4.safetensors``) alone;
2. with ``--pair``: that LoKr + the bundled SD1.5 kohya LoRA (``fixtures/example_sd15_kohya.safetensors``).

Printed per row: wall seconds, CPU seconds (user+sys of the child), output size and dtype, and the largest
relative error ‖ΔW_out − ΔW_exact‖_F / ‖ΔW_exact‖_F over the modules (the exact weighted sum of the inputs'
ΔW, computed here in float64).

    python -P bench/mix_lokr.py [--pair | --only-pair] [--stride N] [--before REV] [--skip-before] [--threads T]

(``-P``: keep bench/ off sys.path.) ``--skip-before`` times only this checkout, and ``--stride N`` mixes every N-th
LoKr module only (the old dense path takes minutes on a 2-core machine; its whole LoKr + LoRA case, tens).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "bench"))  # appended: no bench script shadows a stdlib module

from revision import export_tree  # noqa: E402

LOKR = REPO.parent / "shared" / "fixtures" / "real" / "adapters" / "sd15_kohya_lycoris_lokr_r4.safetensors"
LORA = REPO / "fixtures" / "example_sd15_kohya.safetensors"
BEFORE = "c1080d9"


def run_mix(root: Path, inputs: list[str], out: Path, threads: int) -> tuple[float, float]:
    """(wall s, CPU s) of ``loratool mix INPUTS -o OUT`` with the package under ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loratool", "mix", *inputs, "-o", str(out), "--force", "-q"],
                          env=env, capture_output=True, text=True, cwd=root)  # cwd: -m puts it first on sys.path
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"mix failed ({root}): {proc.stderr.strip()}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def worst_error(inputs: list[str], out: Path) -> float:
    """The largest relative Frobenius error of the output's ΔW against the inputs' exact weighted sum."""
    import torch

    from loratool.formats import read_adapter
    from loratool.ops.inputs import read_inputs

    items = read_inputs(inputs)
    mixed = read_adapter(out)
    worst = 0.0
    for key, m in mixed.modules.items():
        exact = sum(i.weight * i.adapter.modules[key].delta(torch.float64).reshape(m.delta(torch.float64).shape)
                    for i in items if key in i.adapter.modules)
        err = float(torch.linalg.norm(m.delta(torch.float64) - exact) / max(float(torch.linalg.norm(exact)), 1e-30))
        worst = max(worst, err)
    return worst


def every_nth_module(path: Path, stride: int, into: Path) -> Path:
    """A copy of the adapter at ``path`` with every ``stride``-th module (its metadata kept)."""
    from loratool.io.safetensors import load_file, read_metadata
    from loratool.io.writer import write_safetensors

    tensors = load_file(path)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})[::stride]
    kept = {k: t for k, t in tensors.items() if k.rsplit(".", 1)[0] in set(modules)}
    return write_safetensors(into, kept, read_metadata(path))


def describe(out: Path) -> tuple[str, str]:
    from loratool.io.safetensors import SafetensorsFile

    f = SafetensorsFile(out)
    dtypes = sorted({str(f.dtype(k)).removeprefix("torch.") for k in f.keys()})
    return f"{out.stat().st_size / 2**20:.1f} MiB", ", ".join(dtypes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", action="store_true", help="Also mix the LoKr with a LoRA (0.5 each).")
    ap.add_argument("--before", default=BEFORE, help="The git revision timed as 'before'.")
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--only-pair", action="store_true", help="Only the LoKr + LoRA case.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--stride", type=int, default=1, help="Every N-th LoKr module only (the same for both codes).")
    args = ap.parse_args()
    print(f"mix with a LyCORIS LoKr input, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}; {LOKR.name}"
          + (f", every {args.stride}th module" if args.stride > 1 else ""))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lokr = LOKR if args.stride == 1 else every_nth_module(LOKR, args.stride, tmp / "lokr.safetensors")
        cases = [] if args.only_pair else [("LoKr alone", [str(lokr)])]
        if args.pair or args.only_pair:
            cases.append(("LoKr:0.5 + LoRA:0.5", [f"{lokr}:0.5", f"{LORA}:0.5"]))
        trees = [("after (this checkout)", REPO)]
        if not args.skip_before:
            trees.insert(0, (f"before ({args.before}, dense ΔW)", export_tree(args.before, tmp / "before")))
        for case, inputs in cases:
            for label, root in trees:
                out = tmp / f"{len(rows)}.safetensors"
                wall, cpu = run_mix(root, inputs, out, args.threads)
                size, dtypes = describe(out)
                rows.append((case, label, wall, cpu, size, dtypes, worst_error(inputs, out)))
                print(f"  done: {case}, {label}: {wall:.1f} s wall, {cpu:.1f} CPU s, {size} {dtypes}, worst rel. "
                      f"error {rows[-1][-1]:.2e}", flush=True)  # a run cut off keeps what it measured
    head = ("case", "code", "wall s", "CPU s", "output", "dtype", "worst rel. error")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *[(c, lab, f"{w:.1f}", f"{u:.1f}", s, d, f"{e:.2e}")
                                                                     for c, lab, w, u, s, d, e in rows], strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*head).rstrip())
    for c, lab, w, u, s, d, e in rows:
        print(line.format(c, lab, f"{w:.1f}", f"{u:.1f}", s, d, f"{e:.2e}").rstrip())


if __name__ == "__main__":
    main()
