"""Inputs mapped into memory, and what happens when one shrinks while it is mapped.

Adapters are read as views of a private memory map (no copy: an 8 GiB adapter is inspected in a
second). If another program truncates such a file while loratool still uses the views, touching a page
past the new end raises SIGBUS, which would kill the process with no word. The CLI installs
:func:`install_bus_guard`: on SIGBUS it prints one line naming the mapped inputs, removes this process's
temporary outputs (the outputs keep their old contents, or are absent) and exits with status 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading

from loratool.errors import EXIT_ERROR, shown

_MAPPED: dict[str, int] = {}  # path -> how many open maps of it
_LOCK = threading.Lock()
_GUARD: list = []  # keeps the installed C callback alive


def note_mapped(path: str) -> None:
    """``path`` is mapped into this process (until :func:`note_unmapped`)."""
    with _LOCK:
        _MAPPED[path] = _MAPPED.get(path, 0) + 1


def note_unmapped(path: str) -> None:
    with _LOCK:
        n = _MAPPED.get(path, 0) - 1
        if n > 0:
            _MAPPED[path] = n
        else:
            _MAPPED.pop(path, None)


def mapped_paths() -> list[str]:
    with _LOCK:
        return sorted(_MAPPED)


def _on_bus_error(_signum: int) -> None:
    from loratool.io.atomic import in_flight

    names = ", ".join(shown(p) for p in mapped_paths()) or "an input"
    message = (f"loratool: error: {names}: the file changed size while it was read (truncated by another "
               "program?); nothing was written\n")
    try:
        os.write(2, message.encode("utf-8", "backslashreplace"))
        for tmp in in_flight():
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.unlink(tmp)
    except OSError:
        pass
    finally:
        os._exit(EXIT_ERROR)


def install_bus_guard() -> bool:
    """Turn a SIGBUS (a mapped input shrunk) into one line and exit status 1; False where it cannot be
    installed (no C library signal(), not Linux/macOS)."""
    if _GUARD or not hasattr(signal, "SIGBUS"):
        return bool(_GUARD)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
        handler = handler_type(_on_bus_error)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, handler_type]
        if libc.signal(int(signal.SIGBUS), handler) == ctypes.c_void_p(-1).value:
            return False
    except (OSError, AttributeError):
        return False
    _GUARD.append(handler)
    return True
