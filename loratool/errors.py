"""The one exception type the library raises for bad input or a failed operation.

The CLI turns it into ``loratool: error: <file>: <what is wrong>`` and exit code 1.
"""

from __future__ import annotations

import os


class LoraToolError(Exception):
    """Bad input or a failed operation, with the file it concerns (if any)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        return f"{self.path}: {text}" if self.path else text


class SafetensorsError(LoraToolError):
    """A safetensors file that is not valid."""


class UnsupportedInput(LoraToolError):
    """An input the tool recognises but refuses (e.g. a pickle that needs full unpickling)."""
