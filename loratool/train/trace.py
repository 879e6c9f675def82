"""Tracing a training step on the meta device: how much memory it would allocate on a GPU.

Two pieces, used by loratool.train.memory:

* :class:`EmulatedAutocast` stands in for CUDA's ``torch.autocast`` (which acts on CUDA tensors only): it
  casts the inputs of the matrix products and convolutions to the half dtype and runs the normalisations,
  softmax and the loss in fp32, as CUDA's autocast lists do for the layers of a UNet and a CLIP encoder.
  Attention runs as the fused kernel CUDA would pick (flash for half inputs, memory-efficient for fp32),
  which keeps only the output and the log-sum-exp, never the attention matrix.
* :class:`MemoryTrace` follows every tensor the traced code creates, as the CUDA caching allocator would
  count it (sizes rounded up to 512 bytes, a storage counted once however many views share it, freed when
  its last reference goes) and keeps the peak.

Not modelled: cuBLAS/cuDNN workspaces and the fused kernels' scratch buffers (small beside a step's
activations), and the allocator's reserve (``max_memory_reserved`` is higher than what is traced here).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

_HALF_OPS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul,
             torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.baddbmm, torch.addmm}
_FLOAT_OPS = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax,
              F.mse_loss, torch.exp, torch.Tensor.exp}


def _cast(args, kwargs, dtype: torch.dtype):
    def one(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype else x

    return tree_map(one, args), tree_map(one, kwargs)


class EmulatedAutocast(TorchFunctionMode):
    """CUDA autocast's casts, for tensors on the meta device."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*_cast(args, kwargs, self.dtype))
        if func in _HALF_OPS:
            args, kwargs = _cast(args, kwargs, self.dtype)
        elif func in _FLOAT_OPS:
            args, kwargs = _cast(args, kwargs, torch.float32)
        return func(*args, **kwargs)

    @staticmethod
    def _attention(args, kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        given = {**dict(zip(names, args, strict=False)), **kwargs}
        q, k, v = given["query"], given["key"], given["value"]
        mask, causal, scale = given.get("attn_mask"), bool(given.get("is_causal", False)), given.get("scale")
        if mask is None and q.dtype in (torch.float16, torch.bfloat16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]
        if mask is not None:
            mask = mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, 0.0, causal,
                                                                      scale=scale)[0]


def storage_bytes(t: torch.Tensor) -> int:
    """What the CUDA caching allocator counts for a tensor's storage (multiples of 512 bytes)."""
    n = t.untyped_storage().nbytes()
    return (n + 511) // 512 * 512


class MemoryTrace(TorchDispatchMode):
    """The bytes held by tensors created inside the block, now (``live``) and at most (``peak``).

    Tensors in ``existing`` (weights, caches) are not counted, nor anything sharing their storage."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._held: dict[int, int] = {}
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._hold(t)
        return out

    def _hold(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._held or key in self._existing:
            return
        n = storage_bytes(t)
        self._held[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._held.pop(key, 0)
