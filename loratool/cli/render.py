"""Small rich-rendering helpers shared by commands: numbers, sizes, ratios, tables, plots.

Only presentation lives here; what is shown comes from ``loratool.ops``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table

from loratool.errors import LoraToolError


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr). When the output is not a terminal (a pipe, a file, a test
    runner) tables get 160 columns instead of rich's 80, so that wide tables are not squeezed."""
    con = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not con.is_terminal:
        con = Console(stderr=stderr, highlight=False, soft_wrap=False, width=160)
    return con


def fmt_int(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def fmt_bytes(n: float | None) -> str:
    """Binary units, three significant figures: ``1.50 GiB``, ``144 MiB``, ``16 B``."""
    if n is None:
        return "—"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value = float(n)
    i = 0
    while abs(value) >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{int(value)} B"
    return f"{value:.3g} {units[i]}" if value < 1000 else f"{value:.0f} {units[i]}"


def fmt_mib(n_mib: float) -> str:
    return f"{n_mib:,.2f}"


def fmt_ratio(x: float | None) -> str:
    """A reduction ratio: ``80×``, ``56.5×``, ``1.02×``."""
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:,.0f}×"
    return f"{x:.3g}×"


def fmt_float(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}"


def fmt_list(values: Iterable[object], limit: int = 12) -> str:
    vals = ["none" if v is None else fmt_float(v) if isinstance(v, float) else str(v) for v in values]
    if len(vals) > limit:
        return ", ".join(vals[:limit]) + f", … ({len(vals)} values)"
    return ", ".join(vals) if vals else "—"


def make_table(title: str | None, columns: Sequence[str], right: Sequence[str] = ()) -> Table:
    """A table with the given columns; those named in ``right`` are right-aligned (numbers)."""
    t = Table(title=title, title_justify="left", header_style="bold", show_edge=False, pad_edge=False)
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", no_wrap=c in right)
    return t


def key_value_table(rows: Iterable[tuple[str, str]], title: str | None = None) -> Table:
    t = Table(title=title, title_justify="left", show_header=False, show_edge=False, pad_edge=False, box=None)
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


def pyplot():
    """matplotlib's pyplot with a file-only backend, or a clear error when the extra is missing."""
    try:
        import matplotlib
    except ImportError:
        raise LoraToolError("--plot needs matplotlib: pip install 'loratool[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(outputs, fig, path: str) -> None:
    """Save a figure through the command's outputs (format from the file name); one-line error when
    matplotlib cannot draw it."""
    try:
        outputs.save_figure(path, fig, dpi=120, bbox_inches="tight")
    except ValueError as e:
        raise LoraToolError(f"cannot write plot: {e}", path) from None
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def render_summary(summary: dict, path: str, arch: str, reports) -> None:
    """The table ``extract`` and ``resize`` print: modules, ranks, errors, retained energy, skips."""
    con = console()
    table = Table(title=f"{os.path.basename(path)} ({arch})", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("modules", str(summary["modules"]))
    table.add_row("ranks", ", ".join(map(str, summary["ranks"])))
    table.add_row("mean rel. error", f"{summary['mean_rel_error']:.4g}")
    table.add_row("worst rel. error", f"{summary['worst_rel_error']:.4g} ({summary.get('worst_module')})")
    table.add_row("mean retained energy", f"{summary['mean_retained']:.4%}")
    for key, label in (("skipped_unchanged", "skipped, unchanged"),
                       ("skipped_below_min_change", "skipped, below --min-change"), ("excluded", "excluded"),
                       ("dense", "decomposed from dense ΔW")):
        if summary.get(key):
            names = summary[key]
            table.add_row(label, f"{len(names)}: " + ", ".join(names[:4]) + (" …" if len(names) > 4 else ""))
    con.print(table)
    con.print(f"wrote {path}")
