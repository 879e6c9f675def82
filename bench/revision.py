"""A git revision's ``loratool`` package in a folder, and a timed command run with a tree on its path: for
before/after benchmarks in one run."""

from __future__ import annotations

import compileall
import os
import subprocess
import tarfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export_tree(rev: str, into: Path) -> Path:
    """The ``loratool`` package of ``rev`` under ``into`` (a PYTHONPATH entry)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "loratool"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return compiled(into)


def compiled(root: Path) -> Path:
    """``root``'s loratool with its bytecode written, as ``pip install`` leaves a package: without it every run
    of an editable checkout compiles its modules anew (PYTHONDONTWRITEBYTECODE is set on some machines), a
    cost that grows with the code and that no installed copy pays."""
    compileall.compile_dir(str(root / "loratool"), quiet=1)
    return root


def timed(argv: list[str], root: Path) -> float:
    """Wall seconds of ``argv`` run in ``root`` with ``root`` on PYTHONPATH (so ``python -m loratool`` is that
    tree's); a failure stops the benchmark with the command's last words."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, cwd=root)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, argv))} (tree {root}) failed: {proc.stderr.decode().strip()[-400:]}")
    return wall
