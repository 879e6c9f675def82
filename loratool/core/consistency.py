"""Whether a module can make its ΔW: the checks a reader runs on each module it builds
(:func:`loratool.formats.build.build_module`), on shapes alone."""

from __future__ import annotations

import math
from dataclasses import replace

from loratool.core.modules import LoraModule, Module


def check_consistent(module: Module) -> None:
    """``ValueError`` saying what is wrong when a module cannot make its ΔW: an alpha that is not a
    finite number, rank 0, an empty weight, factors whose shapes do not chain, a bias or DoRA magnitude
    that does not fit the weight. The ΔW is built on the meta device: shapes only, no data touched."""
    if module.alpha is not None and not math.isfinite(module.alpha):
        raise ValueError(f"alpha is {module.alpha}, not a finite number")
    rank = module.rank
    if rank is not None and rank < 1:
        raise ValueError("rank 0 (empty factors)")
    if any(t.numel() == 0 for t in module.tensors()):
        raise ValueError("an empty tensor")
    shape, delta_shape = _shapes(module)
    if math.prod(delta_shape) != math.prod(shape) or min(shape, default=0) < 1:
        raise ValueError(f"its tensors make a ΔW of shape {list(delta_shape)} for a weight of shape {list(shape)}")
    if module.bias is not None and module.bias.numel() != shape[0]:
        raise ValueError(f"its bias change has {module.bias.numel()} values for {shape[0]} output rows")


_TENSOR_FIELDS = ("down", "up", "mid", "w1a", "w1b", "w2a", "w2b", "t1", "t2", "w1", "w2", "diff", "w_norm")


def _shapes(module: Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the layer's weight shape, the shape of the ΔW the tensors make). A LoRA's constructor has checked that
    its factors chain, so its ΔW has the weight's shape; other kinds build the ΔW on the meta device (shapes
    only, but ~2 ms a module through torch's Python meta kernels: seconds over a large LoRA)."""
    if isinstance(module, LoraModule) and (module.mid is None or module.mid.dim() == 4):
        return module.weight_shape, module.weight_shape
    try:
        on_meta = replace(module, **{f: getattr(module, f).to("meta") for f in _TENSOR_FIELDS
                                     if getattr(module, f, None) is not None})
        return on_meta.weight_shape, tuple(on_meta.delta().shape)
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"its tensors do not fit together ({' '.join(str(e).split())[:200]})") from None
