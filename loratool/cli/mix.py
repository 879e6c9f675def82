"""``loratool mix A[:w][:lbw=...] B[:w] ... -o OUT``: several adapters into one.

Thin: read the input specs (loratool.ops.inputs), mix (loratool.ops.mix), write (loratool.formats, in the
layout ``formats.output_layout`` picks: the first input's unless --to says otherwise) and render the report.
"""

from __future__ import annotations

from pathlib import Path

import click

from loratool.cli.options import (
    SPEC_HELP,
    debug_option,
    device_option,
    emit_json,
    force_option,
    json_option,
    quiet_option,
    resolve_device,
    to_option,
)
from loratool.core.dtypes import DTYPES
from loratool.io.output import Outputs


@click.command(help="Mix adapters with weights into one: exact (concat, rank Σr), optimal at a rank (svd), "
                    f"or kohya-style factor averaging (linear). Each input is {SPEC_HELP} When the inputs come in "
                    "different layouts, the output takes the first input's layout unless --to names one.")
@click.argument("inputs", nargs=-1, required=True, metavar="A[:W][:lbw=…] B[:W] …")
@click.option("-o", "--output", type=click.Path(dir_okay=True), required=True, help="Output file.")
@click.option("--mode", type=click.Choice(["concat", "svd", "linear"]), default="concat", show_default=True,
              help="concat: exact sum; svd: best rank-r approximation of the sum; linear: factor averaging.")
@click.option("-r", "--rank", type=click.IntRange(min=1), default=None,
              help="svd: output rank (default: the largest input rank). concat: caps the SVD of LoHa/LoKr/full inputs.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Output dtype (default: the inputs' when they agree, else fp32).")
@to_option
@json_option
@quiet_option
@force_option
@device_option
@debug_option
def command(inputs: tuple[str, ...], output: str, mode: str, rank: int | None, dtype: str | None, to: str | None,
            as_json: bool, quiet: bool, force: bool, device: str) -> None:
    from loratool.formats import output_layout, write_adapter
    from loratool.io.metadata import loratool_keys
    from loratool.ops.inputs import parse_inputs, read_inputs
    from loratool.ops.mix import mix

    specs = parse_inputs(inputs)
    items = read_inputs(specs)
    dev = resolve_device(device)
    choice = output_layout(items[0].adapter, to)  # the first input's layout unless --to says otherwise
    fmt = choice.name
    if choice.note and not quiet:
        click.echo(f"loratool: note: {choice.note}", err=True)
    outputs = Outputs([s.path for s in specs], force=force)
    outputs.claim(output, "adapter", folder=fmt == "peft")
    result = mix(items, mode=mode, rank=rank, dtype=DTYPES[dtype] if dtype else None,
                 device=None if dev.type == "cpu" else dev)
    params = {"mode": mode, "rank": rank, "inputs": [f"{Path(i.name).name}:{i.weight:g}"
                                                     + (f":lbw={i.lbw}" if i.lbw else "") for i in items]}
    result.adapter.metadata = {}
    path = write_adapter(result.adapter, output, fmt, metadata=loratool_keys("mix", params), outputs=outputs)
    _render(result, str(path), fmt, as_json=as_json, quiet=quiet)


def _render(result, output: str, fmt: str, *, as_json: bool, quiet: bool) -> None:
    worst = max((r.rel_error for r in result.modules), default=0.0)
    if as_json:
        emit_json({"output": output, "format": fmt, "modules": len(result.modules), "max_rel_error": worst,
                   "warnings": result.warnings,
                   "per_module": [{"key": r.key, "inputs": r.inputs, "rank": r.rank, "method": r.method,
                                   "rel_error": r.rel_error} for r in result.modules]})
        return
    for w in result.warnings:
        click.echo(f"loratool: warning: {w}", err=True)
    if quiet:
        return
    from rich.table import Table

    from loratool.cli.render import console

    con = console()
    table = Table("module", "inputs", "rank", "method", "rel. error")
    for r in result.modules:
        table.add_row(r.key, str(r.inputs), "—" if r.rank is None else str(r.rank), r.method, f"{r.rel_error:.2e}")
    con.print(table)
    con.print(f"{len(result.modules)} modules, largest relative error {worst:.2e}; wrote {output} ({fmt})")
