"""What each output layout can hold lives with its codec (``loratool.formats.layouts.Layout``: kinds, alpha,
rsLoRA, DoRA axes, Tucker cores, fused projections, components); the conversion decides per module from it.
This module keeps the names ``convert`` and the CLI use for it, and the
lossy lowering's defaults (torch-free, so that ``--help`` can show them)."""

from __future__ import annotations

from loratool.formats.layouts import FORMATS, Layout, writable_layout

TargetSpec = Layout
DEFAULT_ENERGY = 0.999  # lossy lowering without --rank: keep this fraction of ‖ΔW‖_F
DEFAULT_RANK_CAP = 128  # ... at no more than this rank
FORMAT_CHOICES: tuple[str, ...] = FORMATS


def resolve_target(name: str) -> Layout:
    """The layout for a ``--to`` value (aliases included), or a one-line error listing the choices."""
    return writable_layout(name)
