"""Every decomposition the tool runs (randomized, exact, factored), the √S split into LoRA factors,
norms of factored products, and rank selection: used by extract, resize, mix, convert and inspect.

Names are imported on first use: the plain-data choices (:mod:`loratool.linalg.policy`: ``RankMode``,
``SvdPolicy``, ``parse_rank_mode``) load without torch, so a command can plan before torch is in."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "clamp_factors": "clamp", "quantile": "clamp",
    "exact_svd": "exact", "thin_svd": "exact", "top_singular": "exact",
    "factored_svd": "factored", "fold_core": "factored", "product_norm": "factored", "product_sq_norm": "factored",
    "stack_factors": "factored", "tail_energy": "factored",
    "randomized_svd": "randomized", "randomized_svd_deferred": "randomized",
    "RankMode": "policy", "parse_rank_mode": "policy", "SvdPolicy": "policy",
    "numerical_rank": "rank", "select_rank": "rank",
    "split_coefficient": "split", "split_singular": "split",
    "Truncation": "truncated", "Truncations": "truncated", "decompose": "truncated", "decompose_batch": "truncated",
    "PendingBatch": "truncated", "sq_norms": "truncated", "start_batch": "truncated",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
