"""The exceptions the library raises for bad input or a failed operation, and the exit codes they map to.

The CLI turns a :class:`LoraToolError` into ``loratool: error: <file>: <what is wrong>`` and exit code 1:
always one line (a path or message holding a newline, a control character or a lone surrogate is shown
escaped), never a traceback unless ``--debug``. :class:`ModulesSkipped` is not a failure: the output was
written, but without modules the user allowed to be left out; it ends the command with exit code 3.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 3  # the output was written, but modules were left out as a flag allowed
EXIT_INTERRUPTED = 130
MAX_MESSAGE_CHARS = 600


def shown(text: str) -> str:
    """``text`` as one printable line: a string with a newline, a control character or a lone
    surrogate is shown as a quoted Python literal, which escapes them; other strings as they are."""
    return text if text.isprintable() else repr(text)


def _printable_message(message: str) -> str:
    text = " ".join(str(message).split())
    if not text.isprintable():  # lone surrogates (from a file's names) cannot even be printed
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = f"{text[:MAX_MESSAGE_CHARS]}… ({len(text) - MAX_MESSAGE_CHARS} more characters)"
    return text


class LoraToolError(Exception):
    """Bad input or a failed operation, with the file it concerns (if any)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None):
        self.message = message
        self.path = None if path is None else os.fsdecode(path)
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = _printable_message(self.message)
        return f"{shown(self.path)}: {text}" if self.path else text


@contextlib.contextmanager
def about(path: str | os.PathLike[str]) -> Iterator[None]:
    """A :class:`LoraToolError` raised inside without a file (a module's math) is about ``path``."""
    try:
        yield
    except LoraToolError as e:
        if e.path is None:
            e.path = os.fsdecode(path)
            e.args = (e.one_line(),)
        raise


class SafetensorsError(LoraToolError):
    """A safetensors file that is not valid."""


class UnsupportedInput(LoraToolError):
    """An input the tool recognises but refuses (e.g. a pickle that needs full unpickling)."""


def examples(names: Sequence[str], count: int = 2) -> str:
    """``'a', 'b' and 5 more``: a few names of a long list, for a one-line message."""
    head = ", ".join(shown(n) for n in names[:count])
    return head + (f" and {len(names) - count} more" if len(names) > count else "")


class ModulesSkipped(Exception):  # noqa: N818 - an outcome, not an error
    """The command wrote its output but left out ``skipped`` (``(module, why)`` pairs), as ``flag``
    allowed. The CLI lists them on stderr and exits with :data:`EXIT_SKIPPED`; the output's metadata
    lists them too (``loratool.skipped``)."""

    def __init__(self, skipped: Sequence[tuple[str, str]], flag: str):
        self.skipped = list(skipped)
        self.flag = flag
        super().__init__(f"{len(self.skipped)} module(s) skipped ({flag})")
