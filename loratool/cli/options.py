"""Options shared by several commands, so each is spelled and documented once."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import click

from loratool.core.dtypes import DTYPE_NAMES

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


def verbose_option(f: F) -> F:
    return click.option("-v", "--verbose", is_flag=True,
                        help="Also print the per-module table (the default is a short summary).")(f)


def dtype_option(help: str = "Output dtype (default: the inputs').") -> Callable[[F], F]:
    return click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None, help=help)


OUTPUT_HELP = "Output: a .safetensors file (the extension is added when missing), or a folder for the peft layout."
FILE_SUFFIXES = (".safetensors", ".sft")
OTHER_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".gguf", ".onnx", ".json", ".yaml", ".txt", ".png")


def output_option(required: bool = True, help: str = OUTPUT_HELP) -> Callable[[F], F]:
    return click.option("-o", "--output", type=click.Path(dir_okay=True), required=required, help=help)


def adapter_output(path: str, layout: str) -> str:
    """``-o`` as ``layout`` writes it: a folder for peft, else a ``.safetensors`` file (the extension added
    when the name has none). An ``-o`` that contradicts the layout is a usage error saying what to do."""
    p = Path(path)
    suffix = p.suffix.lower()
    if layout == "peft":
        if suffix in FILE_SUFFIXES + OTHER_SUFFIXES:
            raise click.UsageError(f"-o {path}: the peft layout is a folder (adapter_config.json and "
                                   f"adapter_model.safetensors): name a folder (-o {p.with_suffix('')}), or "
                                   "write one file with --to kohya")
        return path
    if suffix in FILE_SUFFIXES:
        return path
    if suffix in OTHER_SUFFIXES:
        raise click.UsageError(f"-o {path}: loratool writes safetensors, not {suffix}: name the file "
                               f"{p.with_suffix('.safetensors')}")
    if path.endswith(("/", os.sep)) or p.is_dir():
        raise click.UsageError(f"-o {path} is a folder, but the {layout} layout is one file: name the file "
                               f"(-o {p / 'lora.safetensors'}), or write a folder with --to peft")
    return path + ".safetensors"


def claim_adapter_output(source, to: str | None, output: str, inputs: list, *, force: bool, quiet: bool):
    """(layout, output path, Outputs) of a command that writes one adapter: ``--to``, else ``source``'s own
    layout (with its note on stderr), ``-o`` named as that layout writes it, the output claimed."""
    from loratool.formats import output_layout
    from loratool.io.output import Outputs

    choice = output_layout(source, to)
    if choice.note and not quiet:
        click.echo(f"loratool: note: {choice.note}", err=True)
    output = adapter_output(output, choice.name)
    outputs = Outputs(inputs, force=force)
    outputs.claim(output, "adapter", folder=choice.name == "peft")
    return choice.name, output, outputs


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
                     help="Sketch columns beyond the rank, at least 8 (default: the rank or 8, whichever is "
                          "more: the sketch is at least twice the rank wide)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-module sketches."),
        dtype_option(),
    ]):
        f = opt(f)
    return f


def policy_from(svd: str, niter: int, oversample: int | None, seed: int):
    """The SVD policy that :func:`svd_options` describe."""
    from loratool.linalg import SvdPolicy

    return SvdPolicy(method=svd, niter=niter, oversample=oversample, seed=seed)


def targets_help(prefix: str = "") -> str:
    """The one ``--targets`` vocabulary, as every command's help lists it."""
    from loratool.arch.table import TARGET_ALIASES, TARGET_SETS

    names = "; ".join(f"{name}: {what}" for name, what in TARGET_SETS.items())
    old = ", ".join(f"{a} = {n}" for a, n in TARGET_ALIASES.items())
    return f"{prefix}{names} (old spelling: {old})."


def _target_set(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    from loratool.arch.table import target_set

    return None if value is None else target_set(value)


def targets_option(default: str | None, prefix: str = "Which layers: ") -> Callable[[F], F]:
    """``--targets`` with the vocabulary of ``loratool.arch.table.TARGET_SETS`` (old spellings accepted and
    given their new name)."""
    from loratool.arch.table import TARGET_ALIASES, TARGET_SETS

    return click.option("--targets", type=click.Choice([*TARGET_SETS, *TARGET_ALIASES]), default=default,
                        show_default=default is not None, callback=_target_set, help=targets_help(prefix))


class FamilyChoice(click.Choice):
    """A model family of the registry by name or alias (any case); the value is its name."""

    def __init__(self, with_generic: bool = True):
        from loratool.arch import all_families

        fams = list(all_families(include_generic=with_generic))
        self.names = [f.name for f in fams]
        super().__init__([*self.names, *(a for f in fams for a in f.entry.get("aliases", ()))], case_sensitive=False)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "|".join(self.names)

    def convert(self, value, param, ctx):
        from loratool.arch import canonical_family

        return canonical_family(super().convert(value, param, ctx))


def arch_option(help: str, with_generic: bool = True) -> Callable[[F], F]:
    """``--arch``: a family of the registry (``loratool.arch``), listed in the help."""
    return click.option("--arch", type=FamilyChoice(with_generic), default=None, help=help)


class LayoutChoice(click.Choice):
    """A writable layout by name or alias (``loratool.formats.layouts``); the value is its name."""

    def __init__(self) -> None:
        from loratool.formats.layouts import FORMATS, WRITABLE

        self.names = list(WRITABLE)
        super().__init__(list(FORMATS), case_sensitive=False)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "|".join(self.names)

    def convert(self, value, param, ctx):
        from loratool.formats.layouts import layout

        return layout(super().convert(value, param, ctx)).name


def to_option(f: F) -> F:
    return click.option("--to", "to", type=LayoutChoice(), default=None,
                        help="Output layout (default: the input's own; kohya is what ComfyUI, A1111 and Forge "
                             "load, also called webui/comfyui/a1111/forge).")(f)


SPEC_HELP = "PATH[:WEIGHT][:lbw=BLOCKS] — BLOCKS is a preset (ALL, INS, MIDD, OUTD, …) or 12/17/20/26 numbers."


def emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))
