"""The registry's built tables and name indexes, kept on disk between runs.

Every command that reads an adapter weighs it against every family (``detect``), which needs each family's
module table and kohya/single-file indexes. Building them from the entries and rules takes about 0.2 s on a
2-core machine, every run; loading them built takes a third of that. So the first run stores each family's
(``table``, ``kohya_index``, ``original_index``) here, and later runs load them.

A stored bundle is only ever used by the code that built it: its file name carries a digest of every file of
``loratool/arch`` (code and data), the package version and the Python version, so an edited table, a new
rule or an upgrade builds anew. A file that cannot be read, is not this user's, or does not unpickle is
ignored and built over; a cache that cannot be written is no error (the tables are built each run, as
without one). Where: ``$LORATOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/loratool``, else ``~/.cache/loratool``;
``LORATOOL_CACHE_DIR=off`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import sys
from functools import cache
from pathlib import Path

PREFIX = "arch-"
KEEP_OTHERS = 2  # bundles of other code kept per family (the newest): other installs, recent versions


def folder() -> Path | None:
    """Where bundles live (None: the cache is off)."""
    named = os.environ.get("LORATOOL_CACHE_DIR")
    if named is not None:
        return None if named.strip().lower() in ("", "off", "0", "none") else Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loratool"


@cache
def digest() -> str:
    """What a stored bundle must have been built by: this ``loratool/arch`` (every file's bytes), this
    version of loratool and of Python, this pickle protocol."""
    from loratool import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256(f"{__version__}|{sys.version}|{pickle.HIGHEST_PROTOCOL}".encode())
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:24]


def _path(name: str) -> Path | None:
    where = folder()
    return None if where is None else where / f"{PREFIX}{digest()}-{name}.pickle"


def load(name: str) -> dict | None:
    """The bundle stored for family ``name`` by this code, or None."""
    path = _path(name)
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if hasattr(os, "getuid") and st.st_uid != os.getuid():
                return None  # only what this user stored is unpickled
            found = pickle.load(fh)
    except Exception:  # noqa: BLE001 - missing, unreadable, truncated, stale: built anew
        return None
    return found if isinstance(found, dict) and found.get("family") == name else None


def store(name: str, bundle: dict) -> None:
    """Keep ``bundle`` for family ``name`` (atomically; of the bundles other code stored for it, the
    ``KEEP_OTHERS`` newest stay, the older are removed). Never raises."""
    path = _path(name)
    if path is None:
        return
    with contextlib.suppress(Exception):
        from loratool.io.atomic import atomic_file

        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = pickle.dumps({**bundle, "family": name}, protocol=pickle.HIGHEST_PROTOCOL)
        with atomic_file(path, path) as fh:
            fh.write(data)
        others = [p for p in path.parent.glob(f"{PREFIX}*-{name}.pickle")
                  if p != path and p.name[len(PREFIX) + len(digest()) + 1:] == f"{name}.pickle"]
        others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[KEEP_OTHERS:]:  # two installs side by side keep theirs; an upgrade's old ones go
            old.unlink(missing_ok=True)
