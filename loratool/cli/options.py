"""Options shared by several commands, so each is spelled and documented once."""

from __future__ import annotations

import json
from collections.abc import Callable

import click

F = Callable[..., object]


_DEBUG = "loratool.debug"  # the context-meta key that --debug (group or command) sets


def debugging(ctx: click.Context | None = None) -> bool:
    """Whether --debug was given, before or after the command name."""
    return bool((ctx or click.get_current_context()).meta.get(_DEBUG))


def set_debugging(ctx: click.Context, value: bool) -> None:
    ctx.meta[_DEBUG] = value


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        set_debugging(ctx, True)
    return value


def debug_option(f: F) -> F:
    return click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug, is_eager=True,
                        help="Show tracebacks instead of one-line errors.")(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout, nothing else there.")(f)


def quiet_option(f: F) -> F:
    return click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(f)


def output_option(required: bool = True, help: str = "Output file.") -> Callable[[F], F]:
    return click.option("-o", "--output", type=click.Path(dir_okay=True), required=required, help=help)


def force_option(f: F) -> F:
    return click.option("--force", is_flag=True, help="Overwrite an existing output (never an input).")(f)


def device_option(f: F) -> F:
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                        help="Where the math runs.")(f)


def resolve_device(name: str):
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    import torch

    from loratool.errors import LoraToolError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LoraToolError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoraToolError(f"device {name} asked for, but CUDA is not available")
    return dev


def svd_options(f: F) -> F:
    """--rank-mode, --svd, --niter, --oversample, --seed, --dtype (extract and resize)."""
    for opt in reversed([
        click.option("--rank-mode", default="fixed", show_default=True, metavar="fixed|fro:T|ratio:T|cumulative:T",
                     help="Per-module rank: the minimal one meeting the target, -r/--conv-rank as the cap."),
        click.option("--svd", "svd", type=click.Choice(["randomized", "exact"]), default="randomized",
                     show_default=True, help="Randomized truncated SVD, or the exact float64 reference."),
        click.option("--niter", type=click.IntRange(0, 20), default=2, show_default=True,
                     help="Power iterations of the randomized SVD."),
        click.option("--oversample", type=click.IntRange(8, None), default=None,
                     help="Extra sketch columns (default: the rank, so the sketch is 2r wide)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-module sketches."),
        click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
                     help="Output dtype (default: the inputs')."),
    ]):
        f = opt(f)
    return f


def policy_from(svd: str, niter: int, oversample: int | None, seed: int):
    """The SVD policy that :func:`svd_options` describe."""
    from loratool.linalg import SvdPolicy

    return SvdPolicy(method=svd, niter=niter, oversample=oversample, seed=seed)


def to_option(f: F) -> F:
    return click.option("--to", "to", default=None, metavar="FORMAT",
                        help="Output layout: kohya (webui/comfyui/a1111/forge), diffusers, peft, aitoolkit, bfl.")(f)


SPEC_HELP = "PATH[:WEIGHT][:lbw=BLOCKS] — BLOCKS is a preset (ALL, INS, MIDD, OUTD, …) or 12/17/20/26 numbers."


def emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))
