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

Writing is atomic. A file goes to a temporary file beside its target, is fsynced and renamed over it, and
the folder is fsynced: the target holds the old file or the complete new one, never a part. A folder output
(a peft adapter, a diffusers checkpoint, a training checkpoint) is built as a sibling temporary folder and
swapped in as a whole — in one step with ``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else with
two renames — so a replaced folder never keeps stale files. Temporaries are named
``.<name>.loratool-tmp-<pid>-<random>``; writing to a target removes the temporaries beside it whose process
is gone. A failed write is a one-line :class:`LoraToolError` that names the output.

A *run folder* (``train -o``) is claimed ``in_place``: it is not replaced as a whole; the files and folders
written inside it are, one by one (its missing parents are made).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, Union

from loratool.errors import LoraToolError

if TYPE_CHECKING:
    import torch

PathLike = Union[str, "os.PathLike[str]"]

TEMP_TAG = ".loratool-tmp-"
_NAME_BYTES = 120  # bytes of the target's name kept in a temporary's name (names are at most 255 bytes)


# -- temporaries ---------------------------------------------------------------------------------


def _temp_prefix(name: str) -> str:
    short = os.fsdecode(os.fsencode(name)[:_NAME_BYTES])
    return f".{short}{TEMP_TAG}"


def temp_path(target: Path) -> Path:
    """A fresh temporary beside ``target``: ``.<name>.loratool-tmp-<pid>-<random>``."""
    return target.parent / f"{_temp_prefix(target.name)}{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or no way to tell: keep its files
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries of ``target`` left by processes that are gone (a kill -9, a power cut)."""
    prefix, removed = _temp_prefix(target.name), []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        pid = entry.name[len(prefix):].split("-", 1)[0] if entry.name.startswith(prefix) else ""
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "wb")`` would give: an existing file's mode is kept, a new file
    gets 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_error(e: OSError, path: PathLike) -> LoraToolError:
    return LoraToolError(f"cannot write: {e.strerror or e}", path)


@dataclass(frozen=True)
class _Input:
    given: str
    loc: Path
    real: Path
    is_dir: bool

    @classmethod
    def of(cls, path: PathLike) -> _Input:
        real = _real(path)
        return cls(os.fspath(path), _location(path), real, real.is_dir())


@dataclass(frozen=True)
class _Claim:
    given: str
    loc: Path
    what: str
    folder: bool
    in_place: bool
    make_parents: bool


# -- file objects --------------------------------------------------------------------------------


class _OutputFile(io.BufferedWriter):
    """A buffered output file: a failed write is a one-line error naming the output (not the
    temporary), and ``name`` is the output's path, so that libraries which pick a format from a file's
    name (PIL) see the real one."""

    def __init__(self, fd: int, shown: PathLike):
        super().__init__(io.FileIO(fd, "wb"), buffer_size=1 << 20)
        self._shown = os.fspath(shown)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._shown

    def write(self, data) -> int:  # type: ignore[override]
        try:
            return super().write(data)
        except OSError as e:
            raise _write_error(e, self._shown) from None

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            raise _write_error(e, self._shown) from None

    def commit(self) -> None:
        """Flush and fsync, then close."""
        self.flush()
        try:
            os.fsync(self.fileno())
        except OSError as e:
            raise _write_error(e, self._shown) from None
        self.close()


def _open_new(path: Path, shown: PathLike, mode: int = 0o600, *, exclusive: bool = True) -> _OutputFile:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        raise _write_error(e, shown) from None
    return _OutputFile(fd, shown)


@contextlib.contextmanager
def _atomic_file(target: Path, shown: PathLike) -> Iterator[_OutputFile]:
    """A temporary beside ``target``, renamed over it when the block ends without an error."""
    tmp = temp_path(target)
    fh = _open_new(tmp, shown)
    committed = False
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fh.fileno(), _new_file_mode(target))  # created 0600: give the usual mode
        yield fh
        fh.commit()
        try:
            os.replace(tmp, target)
        except OSError as e:
            raise _write_error(e, shown) from None
        committed = True
        _fsync_dir(target.parent)
    finally:
        if not fh.closed:
            with contextlib.suppress(OSError, LoraToolError):
                fh.close()
        if not committed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# -- writing helpers shared by a command's outputs and a folder being built ----------------------


class _Writes:
    """``write_bytes``/``write_json``/``write_safetensors``/``save_figure`` on top of ``file``."""

    def file(self, path: PathLike) -> contextlib.AbstractContextManager[BinaryIO]:
        raise NotImplementedError

    def _final(self, path: PathLike) -> Path:
        raise NotImplementedError

    def write_bytes(self, path: PathLike, data: bytes) -> Path:
        with self.file(path) as fh:
            fh.write(data)
        return self._final(path)

    def write_json(self, path: PathLike, obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> Path:
        """``obj`` as JSON text and a newline."""
        return self.write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n").encode())

    def write_safetensors(self, path: PathLike, tensors: Mapping[str, torch.Tensor],
                          metadata: Mapping[str, str] | None = None, *, hashes: bool = False) -> Path:
        """A safetensors file in the reference byte layout (``io.writer``); ``hashes=True`` sets
        ``sshs_model_hash``/``sshs_legacy_hash``, computed while writing."""
        from loratool.io.writer import write_file

        with self.file(path) as fh:
            write_file(fh, tensors, metadata, hashes=hashes)
        return self._final(path)

    def save_figure(self, path: PathLike, figure: Any, **options: Any) -> Path:
        """A matplotlib figure, in the format the file name's suffix says (png without one)."""
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        with self.file(path) as fh:
            figure.savefig(fh, format=fmt, **options)
        return self._final(path)


class FolderWriter(_Writes):
    """A folder output being built: names are relative to the folder; everything goes into a temporary
    sibling folder that replaces the output as a whole when the ``with`` block ends without an error."""

    def __init__(self, target: Path, temp: Path, shown: PathLike):
        self.target, self.temp, self._shown = target, temp, Path(shown)

    def _relative(self, name: PathLike) -> PurePosixPath:
        rel = PurePosixPath(os.fspath(name))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise LoraToolError(f"{os.fspath(name)!r} is not a name inside the output folder", self._shown)
        return rel

    def _final(self, path: PathLike) -> Path:
        return self._shown / self._relative(path)

    def path(self, name: PathLike) -> Path:
        """Where ``name`` is being built (its folders made), for a tool that writes a path itself; the
        caller makes sure the file is complete (``sync``) before the block ends."""
        p = self.temp / self._relative(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @contextlib.contextmanager
    def file(self, path: PathLike) -> Iterator[_OutputFile]:
        tmp = self.path(path)
        fh = _open_new(tmp, self._final(path), _new_file_mode(tmp), exclusive=False)
        try:
            yield fh
            fh.commit()
        finally:
            if not fh.closed:
                with contextlib.suppress(OSError, LoraToolError):
                    fh.close()

    def copy(self, source: PathLike, name: PathLike) -> Path:
        """A byte copy of ``source`` (the kernel's copy where it can), synced."""
        tmp = self.path(name)
        try:
            shutil.copyfile(source, tmp)
        except OSError as e:
            if e.filename and os.fspath(e.filename) == os.fspath(source):
                raise
            raise _write_error(e, self._final(name)) from None
        sync(tmp, self._final(name))
        return self._final(name)


def sync(path: Path, shown: PathLike) -> None:
    """fsync a file written by someone else (``FolderWriter.path``)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _write_error(e, shown) from None


@functools.cache
def _renameat2():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where the kernel or file system cannot."""
    fn = _renameat2()
    return fn is not None and fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        _fsync_dir(Path(dirpath))


def _swap_in(built: Path, target: Path) -> None:
    """Put the folder ``built`` at ``target``, replacing what is there as a whole."""
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(built, target)
    elif _exchange(built, target):  # ``built`` now holds the old folder
        _fsync_dir(parent)
        shutil.rmtree(built, ignore_errors=True)
        return
    else:
        old = temp_path(target)  # a temporary's name: removed later if we die before the rmtree
        os.rename(target, old)
        try:
            os.rename(built, target)
        except OSError:
            os.rename(old, target)
            raise
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    _fsync_dir(parent)


# -- one command's outputs -----------------------------------------------------------------------


class Outputs(_Writes):
    """Every path one command invocation writes: claimed up front, then written atomically."""

    def __init__(self, inputs: Iterable[PathLike | None] = (), *, force: bool = False):
        self.force = force
        self._inputs = [_Input.of(p) for p in inputs if p]
        self._claims: list[_Claim] = []

    @property
    def claimed(self) -> list[Path]:
        return [Path(c.given) for c in self._claims]

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
            raise LoraToolError(f"the {found.what} was claimed as a {'run folder' if found.in_place else 'folder' if found.folder else 'file'}", path)
        if found.make_parents:
            loc.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(loc)
        return found

    def _final(self, path: PathLike) -> Path:
        return Path(path)

    @contextlib.contextmanager
    def file(self, path: PathLike) -> Iterator[_OutputFile]:
        """An open binary file whose bytes replace ``path`` atomically when the block ends without an error."""
        claim = self._claim_for(path, folder=False)
        with _atomic_file(claim.loc, path) as fh:
            yield fh

    @contextlib.contextmanager
    def folder(self, path: PathLike) -> Iterator[FolderWriter]:
        """A :class:`FolderWriter` whose folder replaces ``path`` as a whole when the block ends without an error."""
        claim = self._claim_for(path, folder=True)
        tmp = temp_path(claim.loc)
        try:
            tmp.mkdir()
        except OSError as e:
            raise _write_error(e, path) from None
        done = False
        try:
            yield FolderWriter(claim.loc, tmp, path)
            _fsync_tree(tmp)
            try:
                _swap_in(tmp, claim.loc)
            except OSError as e:
                raise _write_error(e, path) from None
            done = True
        finally:
            if not done:
                shutil.rmtree(tmp, ignore_errors=True)
