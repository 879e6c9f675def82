"""Small rich-rendering helpers shared by commands: the consoles, numbers, sizes, ratios, tables, plots and
the one progress display.

Only presentation lives here; what is shown comes from ``loratool.ops``. rich is imported when something
is drawn, so that ``loratool --help`` pays nothing for it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

from loratool.errors import LoraToolError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

PIPE_WIDTH = 4000  # off a terminal: wide enough that no table wraps; lines are not padded to it


class _Unpadded:
    """A text stream that drops the spaces rich pads every table line with (off a terminal only)."""

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._line = ""

    def write(self, text: str) -> int:
        self._line += text
        *done, self._line = self._line.split("\n")
        for line in done:
            self._stream.write(line.rstrip(" ") + "\n")
        return len(text)

    def flush(self) -> None:
        if self._line:
            self._stream.write(self._line.rstrip(" "))
            self._line = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return False


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr). On a terminal, rich's own; off a terminal (a pipe, a file, a test
    runner) lines are as long as their text: nothing wraps and nothing is padded."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(file=stream, highlight=False, soft_wrap=False)
    return Console(file=_Unpadded(stream), highlight=False, soft_wrap=False, width=PIPE_WIDTH,
                   color_system=None)


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
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold", show_edge=False, pad_edge=False)
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", no_wrap=c in right)
    return t


def key_value_table(rows: Iterable[tuple[str, str]], title: str | None = None) -> Table:
    from rich.table import Table

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


def render_summary(summary: dict, path: str, arch: str, reports, *, verbose: bool = False) -> None:
    """What ``extract`` and ``resize`` print: modules, ranks, errors, retained energy, skips; with
    ``verbose`` one row per module."""
    con = console()
    rows = [("modules", str(summary["modules"])), ("ranks", ", ".join(map(str, summary["ranks"])) or "—"),
            ("mean rel. error", f"{summary['mean_rel_error']:.4g}"),
            ("worst rel. error", f"{summary['worst_rel_error']:.4g} ({summary.get('worst_module')})"),
            ("mean retained energy", f"{summary['mean_retained']:.4%}")]
    for key, label in (("skipped_unchanged", "skipped, unchanged"),
                       ("skipped_below_min_change", "skipped, below --min-change"), ("excluded", "excluded"),
                       ("dense", "decomposed from dense ΔW")):
        if summary.get(key):
            names = summary[key]
            rows.append((label, f"{len(names)}: " + ", ".join(names[:4]) + (" …" if len(names) > 4 else "")))
    con.print(key_value_table(rows, title=f"{os.path.basename(path.rstrip('/'))} ({arch})"))
    if verbose:
        t = make_table(None, ["module", "shape", "rank", "rel. error", "retained", "status"],
                       ("rank", "rel. error", "retained"))
        for r in reports:
            t.add_row(r.key, "×".join(map(str, r.shape)), str(r.rank), f"{r.rel_error:.3g}", f"{r.retained:.4%}",
                      r.status)
        con.print(t)
    con.print(f"wrote {path}")


# -- progress ----------------------------------------------------------------------------------

QUIET_SECONDS = 1.0  # off a terminal, work shorter than this prints no progress line
BAR_AFTER = 0.5  # on a terminal, the bar appears once the work has taken this long (no flash for quick work)


class Progress:
    """How far a long command is: a rich bar on a terminal (stderr; from :data:`BAR_AFTER` on), a few plain
    lines on stderr off one (``lines`` of them at most, at even steps, none before :data:`QUIET_SECONDS`),
    nothing when hidden.

    Ops report through callbacks; a command turns them into :meth:`update` (``done`` of ``total``, with a
    note such as the loss) or :meth:`advance` (bytes, for streamed files)."""

    def __init__(self, label: str, total: int | None, *, unit: str, lines: int, in_bytes: bool, show: bool,
                 stream: IO[str] | None = None):
        self.label, self.total, self.unit, self.in_bytes = label, total, unit, in_bytes
        self.done, self.note = 0, ""
        self._lines, self._printed, self._started = max(1, lines), 0, time.monotonic()
        self._stream = stream or sys.stderr
        self._bar = self._task = None
        self.show = show
        self._terminal = show and self._stream.isatty()

    def _rich_bar(self):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        count = DownloadColumn() if self.in_bytes else MofNCompleteColumn()
        return Bar(TextColumn(f"[bold]{self.label}"), BarColumn(), count, TextColumn(self.unit if not self.in_bytes
                   else ""), TextColumn("{task.fields[note]}"), TimeRemainingColumn(),
                   console=console(stderr=True), transient=True)

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        self.done, self.note = done, note
        if total is not None:
            self.total = total
        if self._terminal and self._bar is None and time.monotonic() - self._started >= BAR_AFTER:
            self._bar = self._rich_bar()
            self._task = self._bar.add_task(self.label, total=self.total, note="")
            self._bar.start()
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total, note=note)
        elif self.show and not self._terminal:
            self._plain()

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def print(self, text: str) -> None:
        """A message for the user while the bar runs (a checkpoint written, samples drawn)."""
        if not self.show:
            return
        if self._bar is not None:
            self._bar.console.print(text, highlight=False)
        elif self._terminal:
            console(stderr=True).print(text, highlight=False)
        else:
            self._stream.write(f"loratool: {self.label}: {text}\n")
            self._stream.flush()

    def _amount(self) -> str:
        if self.in_bytes:
            return f"{fmt_bytes(self.done)} of {fmt_bytes(self.total)}"
        return f"{self.done}/{self.total} {self.unit}".rstrip()

    def _plain(self) -> None:
        if not self.total:
            return
        step = min(self._lines, int(self._lines * self.done / self.total))
        elapsed = time.monotonic() - self._started
        if step <= self._printed or elapsed < QUIET_SECONDS:
            return
        self._printed = step
        note = f", {self.note}" if self.note else ""
        self._stream.write(f"loratool: {self.label}: {100 * self.done / self.total:.0f}% ({self._amount()}{note}), "
                           f"{elapsed:.0f} s\n")
        self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def progress(label: str, total: int | None = None, *, unit: str = "modules", lines: int = 4,
             in_bytes: bool = False, show: bool = True) -> Iterator[Progress]:
    """The one progress display of every long command (see :class:`Progress`); ``show=False`` for
    ``--quiet``/``--json``."""
    bar = Progress(label, total, unit=unit, lines=lines, in_bytes=in_bytes, show=show)
    try:
        yield bar
    finally:
        bar.close()
