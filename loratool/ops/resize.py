"""Resize an adapter's ranks on its factors.

A plain LoRA/LoCon module is re-compressed with the factored SVD (QR of ``up`` and of ``downᵀ``,
SVD of the small core; :func:`loratool.linalg.factored.factored_svd`): the dense ``[out, in]``
product is never formed. The scale is kept: ``new_alpha = old_alpha / old_rank × new_rank`` (for
rsLoRA, ``old_scale × new_rank``), so ΔW is exactly the best rank-k truncation of the old ΔW.

LoHa and LoKr have an exact factorisation of small inner size (:mod:`loratool.linalg.structured`), so
they are re-compressed the same way, on those factors (method ``factored``). Modules with no such
form (Tucker/CP LoCon, full diffs) have their dense ΔW built and decomposed with the truncated-SVD
engine, and the report says so (method ``dense``). DoRA magnitudes are kept as they are: the truncation applies to the
directional update, as DoRA trains it. Norm modules pass through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from loratool.core.dtypes import DTYPES
from loratool.core.modules import Adapter, FullModule, LohaModule, LokrModule, LoraModule, NormModule, flat2d
from loratool.formats.read import require_complete
from loratool.linalg import (
    RankMode,
    SvdPolicy,
    decompose,
    factored_svd,
    numerical_rank,
    select_rank,
    split_singular,
)
from loratool.linalg.structured import structured_factors
from loratool.ops.extract_report import ModuleReport

STRUCTURED_RTOL = 1e-12  # singular values of an exact (float64) factorisation below this × σ1 carry no rank


@dataclass(frozen=True)
class ResizeOptions:
    rank: int = 16
    conv_rank: int | None = None
    rank_mode: RankMode = RankMode()
    policy: SvdPolicy = SvdPolicy()
    dtype: str | None = None  # None: each module's own factor dtype
    device: str = "cpu"


@dataclass
class ResizeResult:
    adapter: Adapter
    reports: list[ModuleReport]
    summary: dict


def resize(adapter: Adapter, options: ResizeOptions,
           progress: Callable[[int, int, str], None] | None = None) -> ResizeResult:
    """A new adapter with every module truncated to its rank; the input is not modified.
    ``progress(done, total, key)`` is called after each module."""
    require_complete(adapter)
    out = Adapter(metadata=dict(adapter.metadata), base_model=adapter.base_model,
                  source_format=adapter.source_format, embeddings=dict(adapter.embeddings),
                  unknown=list(adapter.unknown))
    reports: list[ModuleReport] = []
    for done, module in enumerate(adapter.modules.values(), 1):
        if isinstance(module, NormModule):
            out.add(module)
        else:
            new, rep = resize_module(module, options)
            out.add(new)
            reports.append(rep)
        if progress:
            progress(done, len(adapter.modules), module.key)
    return ResizeResult(out, reports, _summary(reports))


def rank_cap(shape: tuple[int, ...], options: ResizeOptions) -> int:
    is_kxk = len(shape) == 4 and math.prod(shape[2:]) > 1
    return options.conv_rank if (is_kxk and options.conv_rank) else options.rank


def resize_module(module, options: ResizeOptions):
    """One module resized: ``(new LoraModule, ModuleReport)``."""
    dev = torch.device(options.device)
    shape = tuple(module.weight_shape)
    cap = rank_cap(shape, options)
    if isinstance(module, LoraModule) and module.mid is None:
        up2d, down2d = flat2d(module.up).to(dev), flat2d(module.down).to(dev)
        u, s, vh = factored_svd(up2d, down2d, name=module.key)
        scale = module.scale
        k = select_rank(s, options.rank_mode, cap)
        method = "factored"
        dtype = module.down.dtype
    elif isinstance(module, (LohaModule, LokrModule)) and structured_factors(module) is not None:
        up2d, down2d = (f.to(dev) for f in structured_factors(module))  # exact, scale included
        u, s, vh = factored_svd(up2d, down2d, dtype=torch.float64)
        k = min(select_rank(s, options.rank_mode, cap), max(1, numerical_rank(s, STRUCTURED_RTOL)))
        u, s, vh = u.float(), s.float(), vh.float()
        scale, method = 1.0, "factored"
        dtype = module.tensors()[0].dtype
    elif isinstance(module, (LoraModule, LohaModule, LokrModule, FullModule)):
        dense = module.delta(torch.float32).to(dev).reshape(shape[0], -1)
        (tr,) = decompose(dense, [module.key], cap, options.rank_mode, options.policy)
        u, s, vh, k = tr.u, tr.s, tr.vh, tr.rank
        s_all_sq = tr.total_sq
        scale, method = 1.0, "dense"
        dtype = module.tensors()[0].dtype
    else:
        raise TypeError(f"cannot resize a {type(module).__name__}")
    if options.dtype is not None:
        dtype = DTYPES[options.dtype]
    if not dtype.is_floating_point:
        dtype = torch.float32
    total = float(s.double().square().sum()) if method == "factored" else s_all_sq
    kept = float(s[:k].double().square().sum())
    up, down = split_singular(u[:, :k], s[:k], vh[:k], dtype=torch.float32)
    up, down = up.to(dtype).cpu(), down.to(dtype).cpu()
    new = _new_module(module, shape, up, down, alpha=scale * k)
    retained = kept / total if total > 0 else 1.0
    rel_error = math.sqrt(max(0.0, total - kept) / total) if total > 0 else 0.0
    rep = ModuleReport(module.key, shape, "ok", 0.0, k, rel_error, min(1.0, retained), method,
                       old_rank=getattr(module, "rank", None))
    return new, rep


def _new_module(module, shape, up: torch.Tensor, down: torch.Tensor, alpha: float) -> LoraModule:
    r = up.shape[1]
    if len(shape) == 4:
        up = up.reshape(shape[0], r, 1, 1)
        down = down.reshape(r, *shape[1:])
    if isinstance(module, LoraModule):
        return replace(module, down=down, up=up, mid=None, alpha=float(alpha), rslora=False)
    return LoraModule(component=module.component, path=module.path, alpha=float(alpha), dora=module.dora,
                      bias=module.bias, down=down, up=up)


def _summary(reports: list[ModuleReport]) -> dict:
    ranks = [r.rank for r in reports]
    worst = max(reports, key=lambda r: r.rel_error, default=None)
    return {
        "modules": len(reports),
        "dense": [r.key for r in reports if r.method == "dense"],
        "ranks": sorted(set(ranks)) if len(set(ranks)) <= 8 else [min(ranks), max(ranks)],
        "mean_retained": sum(r.retained for r in reports) / len(reports) if reports else 1.0,
        "mean_rel_error": sum(r.rel_error for r in reports) / len(reports) if reports else 0.0,
        "worst_rel_error": worst.rel_error if worst else 0.0,
        "worst_module": worst.key if worst else None,
    }
