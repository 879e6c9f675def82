"""Mix several adapters into one, with a weight (and optional block weights) per input.

Three modes, all defined on the weighted sum ``ΔW = Σ w_i ΔW_i`` (ΔW_i with its own alpha/r):

* ``concat`` (default) — exact. The factors are stacked along the rank, each input's ``w_i·s_i``
  folded in as ``√|w_i·s_i|`` on both factors with the sign on ``down``; rank ``Σ r_i`` and
  ``alpha = rank`` (scale 1: every loader computes ``alpha/rank``, while a missing alpha is read as
  1 by some tools and as the rank by others). LoHa and LoKr have no LoRA factors but an exact
  factorisation of inner size ``r1·r2`` (:mod:`loratool.linalg.structured`): its SVD, taken on those
  factors, gives LoRA factors at the numerical rank (reported). Only a full diff (and a Tucker LoHa)
  is decomposed from its dense ΔW, which it stores anyway.
* ``svd`` — the exact sum, then its optimal rank-``rank`` approximation, computed on the stacked
  factors (QR of each side, SVD of the small core, :mod:`loratool.linalg.factored`), LoHa/LoKr by
  their structured factors. A module is densified only when one of its inputs is a full diff.
  The Eckart–Young error is reported.
* ``linear`` — factor averaging as peft's ``linear`` / kohya's merge do it (equal ranks only,
  ``√|w·s|`` on each factor, each weight applied once). It is NOT the weighted sum (the product has
  cross terms ``up_i·down_j``); the error against the sum is reported per module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loratool.core.modules import Adapter, LoraModule, Module, NormModule, flat2d
from loratool.errors import LoraToolError
from loratool.linalg import (
    factored_svd,
    fold_core,
    numerical_rank,
    product_sq_norm,
    split_coefficient,
    split_singular,
    stack_factors,
    tail_energy,
    thin_svd,
)
from loratool.linalg.structured import structured_factors
from loratool.ops.lbw import module_weights

MODES = ("concat", "svd", "linear")
NUMERICAL_RANK_RTOL = 1e-6  # singular values below this × σ1 are float32 noise in a dense ΔW
STRUCTURED_RTOL = 1e-12  # ... and below this × σ1 of an exact (float64) factorisation
LARGE_RESIDUAL = 0.1  # svd mode: warn when a module keeps less than 90 % of its ‖ΔW‖_F
Progress = Callable[[int, int, str], None]  # (modules done, modules in all, the last one's key)


@dataclass
class MixInput:
    adapter: Adapter
    weight: float = 1.0
    lbw: str | None = None
    name: str = ""


@dataclass
class ModuleReport:
    key: str
    inputs: int
    rank: int | None
    method: str  # concat, svd, dense-svd, linear, sum (norm layers)
    rel_error: float = 0.0  # ‖result − Σ w_i ΔW_i‖ / ‖Σ w_i ΔW_i‖


@dataclass
class MixResult:
    adapter: Adapter
    modules: list[ModuleReport]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Term:
    """One input's contribution to a module: LoRA factors with a coefficient, or a dense ΔW.
    ``structured``: the factors are a LoHa/LoKr's exact factorisation (inner size r1·r2, not a rank)."""

    coef: float = 0.0
    up: torch.Tensor | None = None  # [out, r]
    down: torch.Tensor | None = None  # [r, in(, kh, kw)]
    dense: torch.Tensor | None = None  # weighted ΔW in the weight's shape
    bias: torch.Tensor | None = None  # weighted bias change
    structured: bool = False


def lora_factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, r], down [r, in(, kh, kw)])`` with ``up @ flat(down) = product``; a Tucker core is
    folded into ``down`` (exact)."""
    up = flat2d(m.up).float()
    if m.mid is None:
        return up, m.down.float()
    return up, fold_core(m.mid.float(), flat2d(m.down).float())


def _term(m: Module, w: float, factored: bool = True) -> _Term:
    bias = None if m.bias is None else w * m.bias.float()
    if m.dora is not None:
        raise LoraToolError(f"{m.key} is a DoRA module; mixing DoRA magnitudes has no exact meaning")
    if isinstance(m, LoraModule):
        up, down = lora_factors(m)
        return _Term(coef=w * m.scale, up=up, down=down, bias=bias)
    factors = structured_factors(m) if factored else None  # LoHa/LoKr: exact, scale included, float64
    if factors is not None:
        return _Term(coef=w, up=factors[0], down=factors[1], bias=bias, structured=True)
    return _Term(dense=w * m.delta(torch.float32), bias=bias)


def _check_base_models(inputs: list[MixInput]) -> str:
    known = {i.adapter.base_model for i in inputs if i.adapter.base_model not in ("", "unknown")}
    if len(known) > 1:
        names = ", ".join(f"{i.name or '#' + str(n)}={i.adapter.base_model}" for n, i in enumerate(inputs))
        raise LoraToolError(f"inputs are for different base models ({names}); they cannot be mixed")
    return known.pop() if known else "unknown"


def _flat_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    n = 1
    for s in shape[1:]:
        n *= s
    return shape[0], n


def _weight_shape(key: str, mods: list[Module], names: list[str]) -> tuple[int, ...]:
    shapes = [m.weight_shape for m in mods]
    first = shapes[0]
    for s, n in zip(shapes[1:], names[1:], strict=True):
        if _flat_shape(s) != _flat_shape(first):
            raise LoraToolError(f"{key}: layer shape {s} in {n} differs from {first} in {names[0]}; "
                                "the inputs are not for the same model")
    return max(shapes, key=len)  # a 1x1 conv wins over the same layer stored as linear


def _lora_out(m: Module, shape: tuple[int, ...], up2d: torch.Tensor, down2d: torch.Tensor,
              bias: torch.Tensor | None, dtype: torch.dtype) -> LoraModule:
    rank = int(up2d.shape[1])
    if len(shape) == 4:
        up = up2d.reshape(shape[0], rank, 1, 1)
        down = down2d.reshape(rank, shape[1], shape[2], shape[3])
    else:
        up, down = up2d, down2d.reshape(rank, shape[1])
    return LoraModule(component=m.component, path=m.path, alpha=float(rank), down=down.to(dtype).contiguous(),
                      up=up.to(dtype).contiguous(), bias=None if bias is None else bias.to(dtype))


def _sum_bias(terms: list[_Term]) -> torch.Tensor | None:
    biases = [t.bias for t in terms if t.bias is not None]
    return torch.stack(biases).sum(0) if biases else None


def _dense_factors(dense: torch.Tensor, rank: int | None, key: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors of a dense ΔW at its numerical rank (capped by ``rank``), and the relative error."""
    u, s, vh = thin_svd(flat2d(dense), key)
    keep = numerical_rank(s, NUMERICAL_RANK_RTOL)
    keep = max(1, min(keep, rank or keep))
    up, down = split_singular(u[:, :keep], s[:keep], vh[:keep])
    return up, down, tail_energy(s, keep)[1]


def _structured_lora(key: str, t: _Term, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors of a LoHa/LoKr term at the numerical rank of its exact factorisation (capped by
    ``rank``), from the SVD of those factors, and the relative error (0 up to rounding without a cap)."""
    u, s, vh = factored_svd(t.up, t.down, dtype=torch.float64, name=key)
    keep = numerical_rank(s, STRUCTURED_RTOL)
    keep = max(1, min(keep, rank or keep))
    on_up, on_down = split_coefficient(t.coef)
    up, down = split_singular(u[:, :keep], s[:keep], vh[:keep])
    return (up * on_up).float(), (down * on_down).float(), tail_energy(s, keep)[1]


def _concat(key: str, terms: list[_Term], rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    ups, downs, err2, total2, method = [], [], 0.0, 0.0, "concat"
    for t in terms:
        if t.dense is not None or t.structured:
            if t.dense is not None:
                up, down, rel = _dense_factors(t.dense, rank, key)
                norm2, method = float(t.dense.double().square().sum()), "concat+svd"
            else:
                up, down, rel = _structured_lora(key, t, rank)
                norm2 = t.coef**2 * product_sq_norm(t.up, t.down)
                method = method if method == "concat+svd" else "concat+factored"
            err2, total2 = err2 + rel**2 * norm2, total2 + norm2
        else:
            on_up, on_down = split_coefficient(t.coef)
            up, down = t.up * on_up, flat2d(t.down) * on_down
        ups.append(up)
        downs.append(down)
    up2d, down2d = torch.cat(ups, 1), torch.cat(downs, 0)
    return up2d, down2d, (err2 / total2) ** 0.5 if total2 > 0 else 0.0, method


def _svd(key: str, terms: list[_Term], rank: int) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    lora = [(t.up * t.coef, flat2d(t.down)) for t in terms if t.dense is None]
    dense = [flat2d(t.dense) for t in terms if t.dense is not None]
    if not dense:
        structured = any(t.structured for t in terms)
        dtype = torch.float64 if structured else torch.float32
        u, s, vh = factored_svd(*stack_factors(lora, dtype), dtype=dtype, name=key)
        u, s, vh = u.float(), s.float(), vh.float()
        method = "factored-svd" if structured else "svd"
    else:
        total = torch.stack(dense).sum(0)
        for up, down in lora:
            total.addmm_(up.to(total.dtype), down.to(total.dtype))
        u, s, vh = thin_svd(total, key)
        method = "dense-svd"
    k = max(1, min(rank, int(s.shape[0])))
    up, down = split_singular(u[:, :k], s[:k], vh[:k])
    return up, down, tail_energy(s, k)[1], method


def _linear(key: str, terms: list[_Term]) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    if any(t.dense is not None or t.structured for t in terms):
        raise LoraToolError(f"{key}: linear mode needs LoRA inputs; LoHa/LoKr/full modules cannot be averaged")
    ranks = {int(t.up.shape[1]) for t in terms}
    if len(ranks) > 1:
        raise LoraToolError(f"{key}: linear mode needs equal ranks, got {sorted(ranks)} (use concat or svd)")
    splits = [split_coefficient(t.coef) for t in terms]
    up = sum(t.up * a for t, (a, _) in zip(terms, splits, strict=True))
    down = sum(flat2d(t.down) * b for t, (_, b) in zip(terms, splits, strict=True))
    exact_up, exact_down = stack_factors([(t.up * t.coef, flat2d(t.down)) for t in terms])
    diff = product_sq_norm(torch.cat([up, -exact_up], 1), torch.cat([down, exact_down], 0))
    ref = product_sq_norm(exact_up, exact_down)
    return up, down, (max(diff, 0.0) / ref) ** 0.5 if ref > 0 else 0.0, "linear"


def _mix_norm(key: str, mods: list[Module], weights: list[float]) -> Module:
    if not all(isinstance(m, NormModule) for m in mods):
        raise LoraToolError(f"{key}: a norm-layer change in one input and a weight change in another")
    w_norm = sum(w * m.w_norm.float() for m, w in zip(mods, weights, strict=True))
    biases = [w * m.bias.float() for m, w in zip(mods, weights, strict=True) if m.bias is not None]
    return NormModule(component=mods[0].component, path=mods[0].path, w_norm=w_norm,
                      bias=sum(biases) if biases else None)


def input_dtypes(inputs: list[MixInput]) -> list[torch.dtype]:
    """The dtypes the inputs store their tensors in, in input order (each once)."""
    found: dict[torch.dtype, None] = {}
    for i in inputs:
        for m in i.adapter.modules.values():
            for t in m.tensors():
                found.setdefault(t.dtype)
    return list(found)


def mix(inputs: list[MixInput], mode: str = "concat", rank: int | None = None, *,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None, factored: bool = True,
        progress: Progress | None = None) -> MixResult:
    """Mix ``inputs`` into one adapter (see the module docstring for the modes).

    The output keeps the inputs' dtype (the first input's when they differ) unless ``dtype`` says
    otherwise. ``factored=False`` takes LoHa/LoKr through their dense ΔW instead of their exact
    factors (the old way: a reference for tests and benchmarks). ``progress(done, total, key)`` is
    called after each module."""
    if mode not in MODES:
        raise LoraToolError(f"unknown mix mode {mode!r} (use {', '.join(MODES)})")
    if not inputs:
        raise LoraToolError("nothing to mix")
    if rank is not None and rank < 1:
        raise LoraToolError(f"rank must be at least 1, got {rank}")
    base = _check_base_models(inputs)
    names = [i.name or f"input {n + 1}" for n, i in enumerate(inputs)]
    per_input = [module_weights(i.adapter, i.weight, i.lbw, path=i.name or None).weights for i in inputs]
    out = Adapter(base_model=base, source_format="mix")
    stored = input_dtypes(inputs)
    out_dtype = dtype or (stored[0] if stored else torch.float32)
    if mode == "svd" and rank is None:
        rank = max((m.rank or 0 for i in inputs for m in i.adapter.modules.values()), default=0) or 1
    reports: list[ModuleReport] = []
    keys = sorted({k for i in inputs for k in i.adapter.modules})
    for done, key in enumerate(keys, 1):
        present = [(i, n) for n, i in enumerate(inputs) if key in i.adapter.modules]
        mods = [i.adapter.modules[key] for i, _ in present]
        ws = [per_input[n][key] for _, n in present]
        if any(isinstance(m, NormModule) for m in mods):
            out.add(NormModule(**_norm_fields(_mix_norm(key, mods, ws), out_dtype)))
            reports.append(ModuleReport(key, len(mods), None, "sum"))
        else:
            shape = _weight_shape(key, mods, [names[n] for _, n in present])
            terms = [_to_device(_term(m, w, factored), device) for m, w in zip(mods, ws, strict=True)]
            up2d, down2d, err, method = _combine(key, terms, mode, rank)
            out.add(_lora_out(mods[0], shape, up2d.cpu(), down2d.cpu(), _cpu(_sum_bias(terms)), out_dtype))
            reports.append(ModuleReport(key, len(mods), int(up2d.shape[1]), method, err))
        if progress:
            progress(done, len(keys), key)
    warnings = _warnings(inputs, mode, reports, rank)
    if len(stored) > 1 and dtype is None:
        warnings.append(f"the inputs store {', '.join(_dtype_label(d) for d in stored)}: written as "
                        f"{_dtype_label(out_dtype)}, the first input's (--dtype chooses)")
    out.metadata = {"loratool_mix": _describe(inputs, mode, rank)}
    return MixResult(out, reports, warnings)


def _combine(key: str, terms: list[_Term], mode: str, rank: int | None):
    if mode == "concat":
        return _concat(key, terms, rank)
    if mode == "svd":
        return _svd(key, terms, rank or 1)
    return _linear(key, terms)


def _norm_fields(m: NormModule, dtype: torch.dtype) -> dict:
    return {"component": m.component, "path": m.path, "w_norm": m.w_norm.to(dtype),
            "bias": None if m.bias is None else m.bias.to(dtype)}


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def _to_device(t: _Term, device: torch.device | str | None) -> _Term:
    if device is None:
        return t
    def move(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    return _Term(t.coef, move(t.up), move(t.down), move(t.dense), move(t.bias), t.structured)


def _dtype_label(d: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(d, str(d).removeprefix("torch."))


def _warnings(inputs: list[MixInput], mode: str, reports: list[ModuleReport], rank: int | None) -> list[str]:
    out = []
    worst = max(reports, key=lambda r: r.rel_error, default=None)
    if mode == "linear":
        out.append("linear mode averages factors: the result is not the weighted sum of the inputs "
                   f"(largest relative error {worst.rel_error if worst else 0.0:.3g}); use concat for an exact mix")
    if mode == "svd" and worst is not None and worst.rel_error > LARGE_RESIDUAL:
        large = sum(r.rel_error > LARGE_RESIDUAL for r in reports)
        out.append(f"rank {rank} leaves a large residual: ‖ΔW' − ΔW‖/‖ΔW‖ up to {worst.rel_error:.0%} "
                   f"({worst.key}); {large} of {len(reports)} modules lose more than {LARGE_RESIDUAL:.0%}. "
                   "--mode concat is exact (rank Σr); or raise -r")
    dense = sum(r.method in ("concat+svd", "dense-svd") for r in reports)
    if dense:
        out.append(f"{dense} module(s) were decomposed by a dense SVD of their ΔW (a full diff stores no factors)")
    if sum(bool(i.adapter.embeddings) for i in inputs) > 0:
        out.append("token embeddings in the inputs are not mixed and are left out")
    return out


def _describe(inputs: list[MixInput], mode: str, rank: int | None) -> str:
    parts = [f"{i.name or 'adapter'}:{i.weight:g}" + (f":lbw={i.lbw}" if i.lbw else "") for i in inputs]
    return f"mode={mode}" + (f" rank={rank}" if rank else "") + " inputs=" + " ".join(parts)
