"""Exact low-rank factorisations of an adapter module's ΔW, from its own structure.

A LoHa or LoKr ΔW is a Hadamard or Kronecker product of small factors; it has an exact
factorisation ``ΔW_flat = up @ down`` whose inner size is the product of the two ranks, so its
SVD (and its norm) can be taken on factors (:mod:`loratool.linalg.factored`), never on the
dense matrix.
"""

from __future__ import annotations

import torch

from loratool.core.modules import LohaModule, LokrModule, LoraModule, Module, flat2d
from loratool.linalg.factored import fold_core


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
        down = flat2d(module.down).to(f)
        if module.mid is not None:
            down = flat2d(fold_core(module.mid.to(f), down))
        return flat2d(module.up).to(f) * module.scale, down
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
