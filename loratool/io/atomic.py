"""How bytes reach the disk for :mod:`loratool.io.output`: temporaries, fsync, rename, folder swaps.

A file is written to a temporary beside its target, fsynced and renamed over it, and its folder is fsynced:
the target holds the old file or the complete new one, never a part. A folder is built as a sibling
temporary folder (each file fsynced) and swapped in as a whole — in one step with
``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else with two renames — so a replaced folder never
keeps stale files. Temporaries are named ``.<name>.loratool-tmp-<pid>-<random>``; writing to a target
removes the temporaries beside it whose process is gone (a kill -9, a power cut). A failed write is a
one-line :class:`LoraToolError` that names the output, not the temporary.

Nothing here decides *whether* a path may be written: that is :class:`loratool.io.output.Outputs`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, Union

from loratool.errors import LoraToolError
from loratool.io.regular import require_regular

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


_IN_FLIGHT: set[Path] = set()  # this process's temporaries not yet renamed or removed


def in_flight() -> list[Path]:
    """This process's temporaries that exist now (what a fatal signal handler removes)."""
    return sorted(_IN_FLIGHT)


@contextlib.contextmanager
def _tracked(tmp: Path) -> Iterator[Path]:
    _IN_FLIGHT.add(tmp)
    try:
        yield tmp
    finally:
        _IN_FLIGHT.discard(tmp)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no way to tell: keep its files
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
    if e.errno == errno.EFAULT:  # the bytes to write were a view of an input that shrank under us
        return LoraToolError("cannot write: the data came from an input that was cut short while it was read", path)
    return LoraToolError(f"cannot write: {e.strerror or e}", path)


# -- file objects --------------------------------------------------------------------------------


class _OutputFile(io.BufferedWriter):
    """A buffered output file: a failed write is a one-line error naming the output (not the
    temporary), and ``name`` is the output's path, so that libraries which pick a format from a file's
    name (PIL) see the real one."""

    def __init__(self, fd: int, shown: PathLike):
        # 64 KiB: small writes (headers, JSON, tiny tensors) are gathered; a tensor's bytes at or above it go
        # straight to the file. A 1 MiB buffer copied every tensor of a LoRA (most are 20 KiB-1 MiB) once
        # more on the way: 0.1 s of a 435 MiB write.
        super().__init__(io.FileIO(fd, "wb"), buffer_size=1 << 16)
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


Check = Callable[[], None]  # run just before the rename: raises to keep the old output


@contextlib.contextmanager
def atomic_file(target: Path, shown: PathLike, before_commit: Check | None = None) -> Iterator[_OutputFile]:
    """A temporary beside ``target``, renamed over it when the block ends without an error (and
    ``before_commit``, when given, does not raise)."""
    with _tracked(temp_path(target)) as tmp:
        fh = _open_new(tmp, shown)
        committed = False
        try:
            with contextlib.suppress(OSError):
                os.fchmod(fh.fileno(), _new_file_mode(target))  # created 0600: give the usual mode
            yield fh
            fh.commit()
            if before_commit is not None:
                before_commit()
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


class Writes:
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

        try:
            with self.file(path) as fh:
                write_file(fh, tensors, metadata, hashes=hashes)
        except LoraToolError as e:
            if e.path is None:  # a tensor or metadata value refused: say which output it was for
                raise LoraToolError(e.message, self._final(path)) from None
            raise
        return self._final(path)

    def save_figure(self, path: PathLike, figure: Any, **options: Any) -> Path:
        """A matplotlib figure, in the format the file name's suffix says (png without one)."""
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        with self.file(path) as fh:
            figure.savefig(fh, format=fmt, **options)
        return self._final(path)


class FolderWriter(Writes):
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

    def _building(self, name: PathLike) -> Path:
        """Where ``name`` is being built (its folders made)."""
        p = self.temp / self._relative(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @contextlib.contextmanager
    def file(self, path: PathLike) -> Iterator[_OutputFile]:
        tmp = self._building(path)
        fh = _open_new(tmp, self._final(path), _new_file_mode(tmp), exclusive=False)
        try:
            yield fh
            fh.commit()
        finally:
            if not fh.closed:
                with contextlib.suppress(OSError, LoraToolError):
                    fh.close()

    def copy(self, source: PathLike, name: PathLike) -> Path:
        """A byte copy of ``source`` (the kernel's copy where it can), synced; only a regular file is copied
        (a FIFO would block, a device never end)."""
        require_regular(source)
        tmp = self._building(name)
        try:
            shutil.copyfile(source, tmp)
        except OSError as e:
            if e.filename and os.fspath(e.filename) == os.fspath(source):
                raise
            raise _write_error(e, self._final(name)) from None
        _sync(tmp, self._final(name))
        return self._final(name)


def _sync(path: Path, shown: PathLike) -> None:
    """fsync a file written by a path (a copy)."""
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
    """Put the folder ``built`` at ``target``, replacing what is there as a whole. Another process
    that puts its folder there first (the same output written twice at once) is replaced in turn:
    one complete folder wins."""
    parent = target.parent
    if not os.path.lexists(target):
        try:
            os.rename(built, target)
            _fsync_dir(parent)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(built, target):  # ``built`` now holds the old folder
        _fsync_dir(parent)
        shutil.rmtree(built, ignore_errors=True)
        return
    with _tracked(temp_path(target)) as old:  # a temporary's name: removed later if we die before the rmtree
        os.rename(target, old)
        try:
            os.rename(built, target)
        except OSError:
            os.rename(old, target)
            raise
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: Path, shown: PathLike, before_commit: Check | None = None) -> Iterator[FolderWriter]:
    """A :class:`FolderWriter` whose folder replaces ``target`` as a whole when the block ends without
    an error (and ``before_commit``, when given, does not raise)."""
    with _tracked(temp_path(target)) as tmp:
        try:
            tmp.mkdir()
        except OSError as e:
            raise _write_error(e, shown) from None
        done = False
        try:
            yield FolderWriter(target, tmp, shown)
            _fsync_tree(tmp)
            if before_commit is not None:
                before_commit()
            try:
                _swap_in(tmp, target)
            except OSError as e:
                raise _write_error(e, shown) from None
            done = True
        finally:
            if not done:
                shutil.rmtree(tmp, ignore_errors=True)
