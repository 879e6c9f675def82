"""A git revision's ``loratool`` package in a folder, for a before/after benchmark in one run."""

from __future__ import annotations

import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export_tree(rev: str, into: Path) -> Path:
    """The ``loratool`` package of ``rev`` under ``into`` (a PYTHONPATH entry)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "loratool"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into
