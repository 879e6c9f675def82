"""Flux's fused projections: kohya/BFL store one LoRA over ``qkv`` (and ``linear1`` = q, k, v and
the MLP input of a single block); diffusers/ai-toolkit store ``to_q``/``to_k``/``to_v``/``proj_mlp``.

The canonical adapter keeps whatever the file had (a fused pseudo-module such as
``transformer_blocks.N.attn.to_qkv``, or the split modules). :func:`regroup_flux` makes it what
the target needs, exactly: filled in below once the codecs' fuse/split helpers are in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratool.core.modules import Adapter

if TYPE_CHECKING:
    from loratool.ops.convert import ConvertReport
    from loratool.ops.convert_targets import TargetSpec


def regroup_flux(adapter: Adapter, spec: TargetSpec, report: ConvertReport) -> Adapter:
    """The adapter with Flux projections fused or split as ``spec`` needs (unchanged otherwise)."""
    return adapter
