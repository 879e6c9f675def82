"""What each output layout can hold lives with its codec (``loratool.formats.layouts.Layout``: kinds, alpha,
rsLoRA, DoRA axes, Tucker cores, fused projections, components); the conversion decides per module from it.
This module keeps the names ``convert`` and the CLI use for it."""

from __future__ import annotations

from loratool.formats.layouts import FORMATS, Layout, writable_layout

TargetSpec = Layout
FORMAT_CHOICES: tuple[str, ...] = FORMATS


def resolve_target(name: str) -> Layout:
    """The layout for a ``--to`` value (aliases included), or a one-line error listing the choices."""
    return writable_layout(name)
