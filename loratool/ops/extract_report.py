"""What an extraction did, per module and in sum: error, retained energy, what was skipped and why."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass


@dataclass
class ModuleReport:
    key: str
    shape: tuple[int, ...]
    status: str  # "ok" | "unchanged" | "below_min_change"
    change: float  # ‖ΔW‖_F / ‖W‖_F
    rank: int = 0
    rel_error: float = 0.0  # ‖ΔW − up·down‖_F / ‖ΔW‖_F with the factors as stored
    retained: float = 1.0  # Σ_{i≤r} σ_i² / ‖ΔW‖_F²
    method: str = ""
    old_rank: int | None = None  # resize: the rank before

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def summarize(reports: list[ModuleReport], excluded: list[str], missing: list[str],
              tied: dict[str, str] | None = None) -> dict:
    done = [r for r in reports if r.status == "ok"]
    errors = [r.rel_error for r in done]
    worst = max(done, key=lambda r: r.rel_error, default=None)
    ranks = sorted({r.rank for r in done})
    return {
        "modules": len(done),
        "skipped_unchanged": [r.key for r in reports if r.status == "unchanged"],
        "skipped_below_min_change": [r.key for r in reports if r.status == "below_min_change"],
        "excluded": excluded,
        "not_in_inputs": len(missing),
        "tied_to_embedding": dict(tied or {}),  # an output head that is the input embedding: extracted as it
        "ranks": ranks if len(ranks) <= 8 else [ranks[0], ranks[-1]],
        "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
        "worst_rel_error": worst.rel_error if worst else 0.0,
        "worst_module": worst.key if worst else None,
        "mean_retained": sum(r.retained for r in done) / len(done) if done else 1.0,
    }


def compact(reports: list[ModuleReport], summary: dict) -> str:
    """A short JSON string for the output metadata: the summary plus ``key: [rank, error, retained]``."""
    short = {k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or len(v) <= 8}
    for k in ("skipped_unchanged", "skipped_below_min_change", "excluded"):
        short[k] = len(summary[k])
    per = {r.key: [r.rank, _r(r.rel_error), _r(r.retained)] for r in reports if r.status == "ok"}
    return json.dumps({"summary": short, "modules": per}, sort_keys=True, separators=(",", ":"))


def report_room(modules: list[tuple[str, tuple[int, ...], int]]) -> int:
    """Characters enough for the :func:`compact` report of an extraction of ``modules`` (key, shape, rank
    cap), whatever it finds: each module kept at its cap with the widest numbers, and room for the
    summary's short lists (eight keys at most)."""
    widest = 1.234e-100  # what _r makes longest
    fake = [ModuleReport(key, shape, "ok", widest, rank, widest, widest) for key, shape, rank in modules]
    longest = max((len(key) for key, _, _ in modules), default=0)
    return len(json.dumps(compact(fake, summarize(fake, [], []))).encode()) + 1024 + 24 * (longest + 4)


def _r(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x
