"""The ``loratool`` click group: global behaviour (errors, exit codes) and command registration.

Each command lives in its own module under ``loratool/cli/`` and exposes a click command named
``command``. Commands are imported lazily so ``loratool --help`` stays fast and a command's heavy
imports (diffusers for ``train``) cost nothing elsewhere.
"""

from __future__ import annotations

import gc
import importlib
import sys
from typing import NoReturn

import click

from loratool import __version__
from loratool.cli.options import debugging, set_debugging
from loratool.errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_SKIPPED,
    LoraToolError,
    ModulesSkipped,
    shown,
)

# The collector's thresholds for a command's process. Python's defaults (2000, 10, 10) run a full collection
# over everything torch's import leaves behind several times while a command reads and builds a few hundred
# thousand small objects (names, tables, headers): 0.2-0.3 s of a 2.5 s convert on a 2-core machine. Tensors
# and tables are freed by reference counting; cycles are still collected, just less often.
GC_THRESHOLDS = (50_000, 20, 10)
MAX_SKIPPED_LINES = 50  # skipped modules listed on stderr; all of them are in the output's metadata

# name -> (module, one-line example shown in --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("loratool.cli.inspect", "loratool inspect my_lora.safetensors"),
    "ratio": ("loratool.cli.ratio", "loratool ratio --model sdxl --targets transformer -r 8 16 32"),
    "convert": ("loratool.cli.convert", "loratool convert in.safetensors --to kohya -o out.safetensors"),
    "extract": ("loratool.cli.extract", "loratool extract base.safetensors tuned.safetensors -r 32 -o lora.safetensors"),
    "resize": ("loratool.cli.resize", "loratool resize lora.safetensors -r 16 -o small.safetensors"),
    "mix": ("loratool.cli.mix", "loratool mix a.safetensors:0.7 b.safetensors:0.3 -o mixed.safetensors"),
    "merge": ("loratool.cli.merge", "loratool merge model.safetensors lora.safetensors:0.8 -o baked.safetensors"),
    "scale": ("loratool.cli.scale", "loratool scale lora.safetensors 0.5 -o half.safetensors"),
    "train": ("loratool.cli.train", "loratool train --model fixtures/tiny-sd --instance-data imgs -o out"),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use; unknown or unbuilt ones are skipped."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        spec = COMMANDS.get(name)
        if spec is None:
            return None
        try:
            module = importlib.import_module(spec[0])
        except ModuleNotFoundError as e:
            if e.name == spec[0]:
                return None  # not built yet
            raise
        cmd = module.command
        if not getattr(cmd, "_loratool_example", False):  # once: list_commands and get_command both load
            cmd.short_help = f"{(cmd.short_help or cmd.help or '').split(chr(10))[0].rstrip('.')}.  e.g. {spec[1]}"
            cmd._loratool_example = True
        return cmd

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModulesSkipped as e:
            _report_skipped(e)
            ctx.exit(EXIT_SKIPPED)
        except LoraToolError as e:
            if debugging(ctx):
                raise
            _error_line(e.one_line())
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("loratool: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except OSError as e:
            if debugging(ctx):
                raise
            _error_line(LoraToolError(str(e.strerror or e), e.filename).one_line())
            ctx.exit(EXIT_ERROR)
        except RecursionError as e:  # a structure nested too deeply for any reader: still one line
            if debugging(ctx):
                raise
            _error_line(f"an input is nested too deeply to read ({e})")
            ctx.exit(EXIT_ERROR)
        except Exception as e:  # a bug: still one line unless --debug
            if debugging(ctx):
                raise
            what = LoraToolError(f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback")
            _error_line(what.one_line())
            ctx.exit(EXIT_ERROR)


def _error_line(text: str) -> None:
    click.echo(f"loratool: error: {text}", err=True)


def _report_skipped(e: ModulesSkipped) -> None:
    """The modules an output was written without (a flag allowed it): on stderr, one per line."""
    click.echo(f"loratool: skipped {len(e.skipped)} module(s) as {e.flag} allowed; the output's "
               "loratool.skipped metadata lists them:", err=True)
    for name, why in e.skipped[:MAX_SKIPPED_LINES]:
        click.echo(f"  skipped: {shown(name)}: {LoraToolError(why).one_line()}", err=True)
    if len(e.skipped) > MAX_SKIPPED_LINES:
        click.echo(f"  … and {len(e.skipped) - MAX_SKIPPED_LINES} more", err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="loratool")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect, convert, extract, resize, mix, merge and train LoRA adapters for diffusion models."""
    set_debugging(ctx, debug)


def main() -> None:
    from loratool.io.mapped import install_bus_guard

    debug = "--debug" in sys.argv[1:]
    gc.set_threshold(*GC_THRESHOLDS)
    install_bus_guard()  # an input shrunk under a memory map: one line and exit 1, never a SIGBUS
    try:
        cli.main(prog_name="loratool", standalone_mode=True)
    except LoraToolError as e:  # raised outside a command's invoke (e.g. in a callback)
        if debug:
            raise
        _error_line(e.one_line())
        leave(EXIT_ERROR)
    except SystemExit as e:  # click ends every command so
        leave(e.code)
    leave(0)


def leave(code: int | str | None) -> NoReturn:
    """End the process with ``code`` (``sys.exit``'s meaning). Once torch is loaded, the interpreter's
    own teardown — freeing every module torch brought in, destroying a CUDA context — runs after the
    output is complete and took 0.45 s on a 2-core CPU box and ~0.9 s on an H100 host; so what a normal
    exit does that matters is done here (other threads joined and executors shut down, atexit handlers
    run, streams flushed) and the process ends at once."""
    if "torch" not in sys.modules:
        sys.exit(code)
    import atexit
    import os
    import threading

    if code is None or isinstance(code, int):
        status = code or 0
    else:  # sys.exit("message") prints it and fails
        print(code, file=sys.stderr)
        status = 1
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first on its way out
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
