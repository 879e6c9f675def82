"""Benchmark: how long ``loratool --help``, ``inspect`` (headers only) and ``ratio`` take to start, each beside
bare ``python -c pass``, measured in one run (issue 15: --help ≤ 0.3 s, inspect ≤ 0.5 s).

Every command runs in a fresh interpreter (``python -m loratool …``) ``--repeat`` times; the table shows the
median and the fastest wall time, and how much each adds to bare python. With ``--before REV`` (e.g.
c1080d9, before the header-only read path) that revision's tree is exported with ``git archive`` and timed
in the same run, in the same order, for a before/after table.

    python -P bench/startup.py [--repeat N] [--before REV]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "bench"))  # appended: no bench script shadows a stdlib module

from revision import export_tree, timed  # noqa: E402

ADAPTER = REPO / "fixtures" / "example_sd15_kohya.safetensors"
COMMANDS = [
    ("--help", ["--help"]),
    ("inspect ADAPTER", ["inspect", str(ADAPTER)]),
    ("inspect ADAPTER --json", ["inspect", str(ADAPTER), "--json"]),
    ("ratio ADAPTER", ["ratio", str(ADAPTER)]),
    ("ratio --model sdxl -r 8 16", ["ratio", "--model", "sdxl", "-r", "8", "16"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--before", default=None, help="A git revision to time beside this checkout.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = [("after", REPO)]
        if args.before:
            trees.insert(0, (f"before ({args.before})", export_tree(args.before, Path(tmp))))
        runs: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeat):  # interleaved, so that machine load falls on every row alike
            runs.setdefault(("", "python -c pass"), []).append(timed([sys.executable, "-c", "pass"], REPO))
            for label, root in trees:
                for name, argv in COMMANDS:
                    runs.setdefault((label, name), []).append(timed([sys.executable, "-m", "loratool", *argv], root))
    bare = statistics.median(runs[("", "python -c pass")])
    print(f"start-up, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}; median and fastest of {args.repeat} "
          "fresh interpreters")
    head = ("code", "command", "median s", "fastest s", "over bare python s")
    rows = [(label, name, f"{statistics.median(t):.3f}", f"{min(t):.3f}",
             "—" if not label else f"{statistics.median(t) - bare:+.3f}") for (label, name), t in runs.items()]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*head).rstrip())
    for r in rows:
        print(line.format(*r).rstrip())


if __name__ == "__main__":
    main()
