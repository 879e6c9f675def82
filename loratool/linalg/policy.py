"""The choices a decomposition is run with, as plain data (no torch): the rank mode, the SVD policy and
the sketch width it implies. Kept apart so that a command can parse and plan before torch is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loratool.errors import LoraToolError

MODES = ("fixed", "fro", "ratio", "cumulative")


@dataclass(frozen=True)
class RankMode:
    kind: str = "fixed"
    value: float = 0.0

    @property
    def needs_full_spectrum(self) -> bool:
        return self.kind == "cumulative"

    def __str__(self) -> str:
        return self.kind if self.kind == "fixed" else f"{self.kind}:{self.value:g}"


def parse_rank_mode(text: str) -> RankMode:
    """``fixed``, ``fro:0.9``, ``ratio:4`` or ``cumulative:0.9`` -> :class:`RankMode`."""
    text = text.strip().lower()
    if text == "fixed":
        return RankMode()
    kind, _, raw = text.partition(":")
    if kind not in MODES or kind == "fixed" or not raw:
        raise LoraToolError(f"rank mode {text!r}: use fixed, fro:T, ratio:T or cumulative:T")
    try:
        value = float(raw)
    except ValueError:
        raise LoraToolError(f"rank mode {text!r}: {raw!r} is not a number") from None
    if kind == "ratio" and not (value >= 1 and math.isfinite(value)):
        raise LoraToolError(f"rank mode {text!r}: the ratio must be a finite number >= 1")
    if kind in ("fro", "cumulative") and not 0 < value <= 1:
        raise LoraToolError(f"rank mode {text!r}: the target must lie in (0, 1]")
    return RankMode(kind, value)


def sketch_width(rank: int, oversample: int | None, m: int, n: int) -> int:
    """ℓ = rank + oversampling (at least 8; default ``max(rank, 8)``), capped by the matrix size."""
    extra = max(rank, 8) if oversample is None else max(int(oversample), 8)
    return min(rank + extra, m, n)


METHODS = ("randomized", "exact")


@dataclass(frozen=True)
class SvdPolicy:
    method: str = "randomized"
    niter: int = 2
    oversample: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"svd method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.niter < 0:
            raise ValueError("niter must be >= 0")

    def uses_exact(self, rank: int, m: int, n: int) -> bool:
        if self.method == "exact":
            return True
        return 2 * sketch_width(rank, self.oversample, m, n) >= min(m, n)
