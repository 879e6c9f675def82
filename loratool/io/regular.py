"""Inputs are regular files (or folders): never a FIFO, a device or a socket.

Opening a FIFO for reading blocks until a writer appears, and ``/dev/zero`` or ``/dev/urandom`` never
end, so a command pointed at one would hang or eat memory. Every file loratool reads is opened here
(or checked here, where a library opens it by path): non-blocking, then ``fstat``, so that what is
checked is what is read, before a single byte is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import BinaryIO

from loratool.errors import LoraToolError


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse(mode: int, path: str | os.PathLike[str]) -> LoraToolError:
    return LoraToolError(f"is {_kind(mode)}, not a file: refusing to read it", path)


def require_regular(path: str | os.PathLike[str]) -> os.stat_result:
    """The ``stat`` of ``path`` (symlinks followed) when it is a regular file or a folder; else a
    one-line :class:`LoraToolError`. ``OSError`` (missing, no permission) passes through."""
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise _refuse(st.st_mode, path)
    return st


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading, only when it is a regular file (symlinks followed). A folder
    raises ``IsADirectoryError``; a FIFO, device or socket a one-line :class:`LoraToolError` — without
    blocking on it. Other ``OSError`` passes through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise _refuse(mode, path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
