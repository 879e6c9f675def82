"""The tensor rewrites a conversion may need, one module at a time.

Exact ones (same ΔW up to float rounding): folding the scale into the factors, rsLoRA to a plain
alpha, a Tucker core folded into ``down``. The lossy one: any module to plain LoRA through a
truncated SVD of its ΔW, with the relative error it costs measured on what will be written.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from loratool.core.modules import LohaModule, LokrModule, LoraModule, Module, flat2d
from loratool.linalg import RankMode, select_rank
from loratool.linalg.factored import factored_svd, split_singular

DEFAULT_ENERGY = 0.999  # keep this fraction of ‖ΔW‖_F when no rank is given
DEFAULT_RANK_CAP = 128


def unfold_rslora(module: LoraModule) -> LoraModule:
    """rsLoRA ``alpha/√r`` as a plain ``alpha'/r``: ``alpha' = alpha·√r`` (no tensor changes)."""
    if not module.rslora:
        return module
    alpha = None if module.alpha is None else module.alpha * math.sqrt(module.rank)
    return replace(module, alpha=alpha, rslora=False)


def fold_scale(module: LoraModule) -> LoraModule:
    """The scale moved into the factors as ``√scale`` on each (keeps fp16 in range); no alpha left.

    A scale of exactly 1 changes no tensor. The factors are rescaled in float32 and stored back in
    their own dtype.
    """
    scale = module.scale
    if scale == 1.0:
        return replace(module, alpha=None, rslora=False)
    root = math.sqrt(abs(scale))
    sign = -1.0 if scale < 0 else 1.0
    down = (module.down.to(torch.float32) * root).to(module.down.dtype)
    up = (module.up.to(torch.float32) * (root * sign)).to(module.up.dtype)
    return replace(module, down=down, up=up, alpha=None, rslora=False)


def fold_tucker(module: LoraModule) -> LoraModule:
    """A LoCon Tucker module (``up · mid · down``) as a flat LoCon with ``down' = mid ⊛ down``.

    ``down'[i, c, h, w] = Σ_j mid[i, j, h, w] · down[j, c]`` has the layer's kernel, so
    ``up @ down'`` is the same ΔW at the same rank. The alpha is rescaled when the core is not
    square, so that ``alpha / rows(down')`` stays the module's scale.
    """
    if module.mid is None:
        return module
    mid = module.mid.to(torch.float32)
    down = flat2d(module.down).to(torch.float32)
    folded = torch.einsum("ijhw,jc->ichw", mid, down).to(module.down.dtype)
    alpha = module.alpha
    if alpha is not None and not module.rslora and folded.shape[0] != module.rank:
        alpha = alpha * folded.shape[0] / module.rank
    return replace(module, down=folded, mid=None, alpha=alpha)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """‖approx − reference‖_F / ‖reference‖_F in float64 (0 for a zero reference matched exactly)."""
    ref = reference.to(torch.float64)
    diff = float((approx.to(torch.float64) - ref).norm())
    total = float(ref.norm())
    if total == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / total


def structured_factors(module: Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An exact factorisation ``ΔW_flat = up @ down`` (float64, scale included) with a small inner
    size, from the module's own structure; None when it has none worth using (full diffs, Tucker LoHa).

    * LoRA: ``up · (mid ⊛ down)``;
    * LoHa: ``(A1·B1) ⊙ (A2·B2) = (A1 ⊙row A2) · (B1 ⊙col B2)``, inner size ``r1·r2``;
    * LoKr: with each side as a product ``w = P·Q`` (its two factors, or the whole side beside an
      identity), ``kron(P1·Q1, P2·Q2) = kron(P1, P2) · kron(Q1, Q2)``, inner size ``r1·r2``. A conv
      ``w2`` is used flat: the flat conv ΔW is ``kron(w1, flat(w2))``.
    """
    f = torch.float64
    if isinstance(module, LoraModule):
        flat = fold_tucker(module) if module.mid is not None else module
        return flat2d(flat.up).to(f) * flat.scale, flat2d(flat.down).to(f)
    if isinstance(module, LohaModule) and module.t1 is None and module.t2 is None:
        a1, a2 = flat2d(module.w1a).to(f), flat2d(module.w2a).to(f)
        b1, b2 = flat2d(module.w1b).to(f), flat2d(module.w2b).to(f)
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1) * module.scale
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return up, down
    if isinstance(module, LokrModule) and module.t2 is None:
        p1, q1 = _pair(module.w1, module.w1a, module.w1b)
        p2, q2 = _pair(module.w2, module.w2a, module.w2b)
        return torch.kron(p1, p2) * module.scale, torch.kron(q1, q2)
    return None


def _pair(whole: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None):
    """One LoKr side as ``P @ Q`` (float64, flat): its two factors, or the whole matrix beside an
    identity on its smaller side."""
    f = torch.float64
    if whole is None:
        return flat2d(a).to(f), flat2d(b).to(f)
    w = flat2d(whole).to(f)
    if w.shape[0] <= w.shape[1]:
        return torch.eye(w.shape[0], dtype=f), w
    return w, torch.eye(w.shape[1], dtype=f)


def _lowrank_sq_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """‖up @ down‖_F² from two Gram matrices of the inner size."""
    return float(((up.T @ up) * (down @ down.T)).sum())


def top_singular(matrix: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading (at most ``cap``) singular triplets of a float64 matrix, from the eigenvectors of
    the smaller Gram matrix. Singular values below ``1e-12·σ₁`` are dropped (they carry no energy
    worth a rank); the kept ones are as accurate as the Gram route allows, and the caller measures
    the error of what it keeps anyway. Unlike a full SVD this stays fast on the wide, very low-rank
    ΔW of a LoKr/LoHa conv (e.g. 1280 × 11520 at rank 16)."""
    x = matrix.to(torch.float64)
    wide = x.shape[0] <= x.shape[1]
    gram = x @ x.T if wide else x.T @ x
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    s = evals.sqrt()
    keep = int((s > 1e-12 * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 1
    keep = max(1, min(keep, cap))
    s, vecs = s[:keep], evecs[:, :keep]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if wide:
        u, vh = vecs, (x.T @ vecs / safe).T
    else:
        u, vh = x @ vecs / safe, vecs.T
    return u, s, vh


def lower_to_lora(module: Module, rank: int | None = None, *, energy: float = DEFAULT_ENERGY,
                  cap: int = DEFAULT_RANK_CAP, dtype: torch.dtype | None = None) -> tuple[LoraModule, float]:
    """Any module as a plain LoRA from the truncated SVD of its ΔW, and the relative error.

    ``rank`` fixes the rank; without it the smallest rank keeping ``energy`` of ‖ΔW‖_F is used,
    at most ``cap``. The singular values are split as ``√S`` on both factors; alpha is the rank
    (scale 1). The error is measured against the factors as stored (after the cast to ``dtype``,
    by default the module's own).
    """
    shape = tuple(module.weight_shape)
    factors = structured_factors(module)
    limit = max(1, rank if rank is not None else cap)
    if factors is not None:
        up0, down0 = factors
        u, s, vh = factored_svd(up0, down0, dtype=torch.float64)
        keep = int((s > 1e-12 * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 1
        u, s, vh = u[:, :max(1, min(keep, limit))], s[:max(1, min(keep, limit))], vh[:max(1, min(keep, limit))]
        total_sq = _lowrank_sq_norm(up0, down0)
    else:
        matrix = flat2d(module.delta(torch.float64))
        u, s, vh = top_singular(matrix, limit)
        total_sq = float(matrix.square().sum())
    if rank is None:
        k = select_rank(s, RankMode("fro", energy), cap, total_sq=total_sq)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    up, down = split_singular(u, s, vh)
    k = int(s.shape[0])
    store = dtype or module.tensors()[0].dtype
    up, down = up.to(store), down.to(store)
    if factors is not None:  # measured on the factors as stored, never densified
        stacked_up = torch.cat([up0, -up.to(torch.float64)], dim=1)
        stacked_down = torch.cat([down0, down.to(torch.float64)], dim=0)
        err = math.sqrt(max(0.0, _lowrank_sq_norm(stacked_up, stacked_down)) / total_sq) if total_sq > 0 else 0.0
    else:
        err = relative_error(matrix, up.to(torch.float64) @ down.to(torch.float64))
    if len(shape) == 4:
        down = down.reshape(k, *shape[1:])
        up = up.reshape(shape[0], k, 1, 1)
    lora = LoraModule(module.component, module.path, alpha=float(k), dora=module.dora,
                      down=down.contiguous(), up=up.contiguous())
    return lora, err
