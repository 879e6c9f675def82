"""The one writer: every file and folder loratool writes goes through here.

One :class:`Outputs` per command invocation knows the command's inputs and whether ``--force`` was given.
The command claims every path it will write before any work starts (:meth:`Outputs.claim`). A claim is
refused when

* the path is an input — by any spelling, a hard link or a symlink to it — or lies inside an input
  folder, or is a folder output (replaced as a whole) that holds an input;
* something is there already and ``--force`` was not given (an empty folder does not count);
* another output of the same command claimed the same path, or one would lie inside the other (a report
  over the adapter, two token files with one name, a plot inside a peft folder);
* its folder does not exist.

Then :meth:`Outputs.file`, :meth:`Outputs.folder` and the helpers (``write_bytes``, ``write_json``,
``write_safetensors``, ``save_figure``) write atomically through :mod:`loratool.io.atomic`: a file is
written beside its target and renamed over it; a folder output (a peft adapter, a diffusers checkpoint, a
training checkpoint) is built beside its target and swapped in as a whole, so it never keeps stale files.
A path used without a claim is claimed on first use, with the same checks.

A *run folder* (``train -o``) is claimed ``in_place``: it is not replaced as a whole; the files and folders
written inside it are, one by one (its missing parents are made).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loratool.errors import LoraToolError
from loratool.io.atomic import (
    TEMP_TAG,
    FolderWriter,
    PathLike,
    Writes,
    atomic_file,
    atomic_folder,
    remove_stale_temporaries,
)

__all__ = ["TEMP_TAG", "FolderWriter", "Outputs"]

# -- paths ---------------------------------------------------------------------------------------


def _location(path: PathLike) -> Path:
    """Where a write to ``path`` lands: its folder resolved, its own name kept (a symlink there is
    replaced, not followed)."""
    p = Path(os.path.abspath(path))
    try:
        return p.parent.resolve() / p.name if p.name else p.resolve()
    except (OSError, RuntimeError):
        raise LoraToolError("cannot resolve this path (a symlink loop?)", path) from None


def _real(path: PathLike) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        raise LoraToolError("cannot resolve this path (a symlink loop?)", path) from None


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


MAX_WATCHED_FILES = 10_000  # files of one input folder whose state is compared before a commit


def _state(real: Path) -> tuple:
    """What changes when an input is written to: (size, mtime, inode) of the file, or of every file
    under a folder (a few at most for an adapter, dozens for a model folder)."""
    def one(p: Path) -> tuple:
        try:
            st = os.stat(p)
        except OSError:
            return (os.fspath(p), None)
        return (os.fspath(p), st.st_size, st.st_mtime_ns, st.st_ino)

    if not real.is_dir():
        return (one(real),)
    found = []
    for dirpath, dirnames, filenames in os.walk(real):
        dirnames.sort()
        found.extend(one(Path(dirpath, n)) for n in sorted(filenames))
        if len(found) > MAX_WATCHED_FILES:
            break
    return tuple(found)


@dataclass(frozen=True)
class _Input:
    given: str
    loc: Path
    real: Path
    is_dir: bool
    state: tuple

    @classmethod
    def of(cls, path: PathLike, watch: bool = True) -> _Input:
        try:
            loc, real = _location(path), _real(path)
        except LoraToolError:  # an input that cannot be resolved cannot be read either: its reader says so
            loc = real = Path(os.path.abspath(path))
        return cls(os.fspath(path), loc, real, real.is_dir(), _state(real) if watch else ())


@dataclass(frozen=True)
class _Claim:
    given: str
    loc: Path
    what: str
    folder: bool
    in_place: bool
    make_parents: bool


# -- one command's outputs -----------------------------------------------------------------------


class Outputs(Writes):
    """Every path one command invocation writes: claimed up front, then written atomically."""

    def __init__(self, inputs: Iterable[PathLike | None] = (), *, force: bool = False, watch_inputs: bool = True):
        """``watch_inputs``: refuse to commit an output when an input changed since now (False for a run
        that reads its inputs into caches once and writes into its own class-image folder: train)."""
        self.force = force
        self._watch = watch_inputs
        self._inputs = [_Input.of(p, watch_inputs) for p in inputs if p]
        self._claims: list[_Claim] = []

    def claim(self, path: PathLike, what: str = "output", *, folder: bool = False, in_place: bool = False) -> Path:
        """Reserve ``path`` for this command's ``what`` (a file; a folder replaced as a whole with
        ``folder``; a run folder written file by file with ``in_place`` too), or refuse in one line.
        Claiming the same path again for the same ``what`` is a no-op."""
        loc = _location(path)
        for c in self._claims:
            if c.loc == loc:
                if (c.what, c.folder, c.in_place) == (what, folder, in_place):
                    return Path(path)
                raise LoraToolError(f"the {what} and the {c.what} would be written to the same path", path)
            if loc.is_relative_to(c.loc) and not c.in_place:
                raise LoraToolError(f"the {what} would be written inside the {c.what} ({c.given})", path)
            if c.loc.is_relative_to(loc) and not (folder and in_place):
                raise LoraToolError(f"the {c.what} ({c.given}) would be written inside the {what}", path)
        self._check_inputs(path, loc, whole_folder=folder and not in_place)
        host = any(c.in_place and loc.is_relative_to(c.loc) for c in self._claims)
        make_parents = host or (folder and in_place)
        self._check_place(path, loc, folder=folder, replace=self.force or host, make_parents=make_parents)
        self._claims.append(_Claim(os.fspath(path), loc, what, folder, in_place, make_parents))
        return Path(path)

    def _check_inputs(self, path: PathLike, loc: Path, *, whole_folder: bool) -> None:
        real = _real(path)
        for src in self._inputs:
            if loc == src.loc or real == src.real or _samefile(real, src.real):
                raise LoraToolError("refusing to overwrite an input", path)
            if src.is_dir and (loc.is_relative_to(src.real) or loc.is_relative_to(src.loc)):
                raise LoraToolError(f"refusing to write inside an input folder ({src.given})", path)
            if whole_folder and (src.loc.is_relative_to(loc) or src.real.is_relative_to(real)):
                raise LoraToolError(f"refusing to replace a folder that holds an input ({src.given})", path)

    @staticmethod
    def _check_place(path: PathLike, loc: Path, *, folder: bool, replace: bool, make_parents: bool) -> None:
        if os.path.lexists(loc):
            if folder and (loc.is_symlink() or not loc.is_dir()):
                raise LoraToolError("output exists and is not a folder", path)
            if not folder and loc.is_dir():
                raise LoraToolError("output is a folder", path)
            empty = folder and not any(os.scandir(loc))
            if not (replace or empty):
                raise LoraToolError("output exists (use --force to overwrite)", path)
        if not make_parents and not loc.parent.is_dir():
            raise LoraToolError("the output's folder does not exist", path)

    def _claim_for(self, path: PathLike, *, folder: bool) -> _Claim:
        loc = _location(path)
        found = next((c for c in self._claims if c.loc == loc), None)
        if found is None:
            self.claim(path, folder=folder)
            found = self._claims[-1]
        if found.folder != folder or found.in_place:
            kind = "run folder" if found.in_place else "folder" if found.folder else "file"
            raise LoraToolError(f"the {found.what} was claimed as a {kind}", path)
        if found.make_parents:
            loc.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(loc)
        return found

    def _final(self, path: PathLike) -> Path:
        return Path(path)

    @contextlib.contextmanager
    def file(self, path: PathLike) -> Iterator[BinaryIO]:
        """An open binary file whose bytes replace ``path`` atomically when the block ends without an error."""
        claim = self._claim_for(path, folder=False)
        with atomic_file(claim.loc, path, self.check_inputs_unchanged) as fh:
            yield fh

    @contextlib.contextmanager
    def folder(self, path: PathLike) -> Iterator[FolderWriter]:
        """A :class:`FolderWriter` whose folder replaces ``path`` as a whole when the block ends without an error."""
        claim = self._claim_for(path, folder=True)
        with atomic_folder(claim.loc, path, self.check_inputs_unchanged) as folder:
            yield folder

    def check_inputs_unchanged(self) -> None:
        """Refuse to commit an output when an input changed since the command started (another program
        wrote to it or cut it short while it was read): the output could mix old and new data."""
        for src in self._inputs if self._watch else ():
            if _state(src.real) != src.state:
                raise LoraToolError("the input changed while it was read (another program wrote to it); "
                                    "nothing was written: run the command again", src.given)
