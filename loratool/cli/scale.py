"""``loratool scale IN WEIGHT -o OUT [--lbw BLOCKS]``: change an adapter's strength exactly."""

from __future__ import annotations

from pathlib import Path

import click

from loratool.cli.options import (
    debug_option,
    emit_json,
    force_option,
    json_option,
    quiet_option,
    to_option,
)
from loratool.io.output import Outputs


@click.command(help="Scale an adapter's strength exactly (ΔW → w·ΔW): alpha where the file stores it, else one "
                    "factor; --lbw scales per block. A negative WEIGHT may need `--` before it.",
               context_settings={"ignore_unknown_options": True})
@click.argument("input_path", metavar="IN", type=click.Path(exists=True, dir_okay=True))
@click.argument("weight", type=float)
@click.option("-o", "--output", type=click.Path(dir_okay=True), required=True, help="Output file.")
@click.option("--lbw", default=None, metavar="BLOCKS",
              help="Block weights: a preset (ALL, INS, MIDD, OUTD, …) or 12/17/20/26 comma-separated numbers.")
@click.option("--arch", default=None, help="Base model for --lbw when the file does not say (sd1, sdxl, …).")
@to_option
@json_option
@quiet_option
@force_option
@debug_option
def command(input_path: str, weight: float, output: str, lbw: str | None, arch: str | None, to: str | None,
            as_json: bool, quiet: bool, force: bool) -> None:
    from loratool.formats import output_layout, read_adapter, write_adapter
    from loratool.io.metadata import loratool_keys
    from loratool.ops.scale import scale

    adapter = read_adapter(input_path)
    choice = output_layout(adapter, to)  # the input's own layout unless --to says otherwise
    fmt = choice.name
    if choice.note and not quiet:
        click.echo(f"loratool: note: {choice.note}", err=True)
    outputs = Outputs([input_path], force=force)
    outputs.claim(output, "adapter", folder=fmt == "peft")
    scaled, weights = scale(adapter, weight, lbw, arch_name=arch, path=input_path)
    params = {"weight": weight, "lbw": lbw, "input": Path(input_path).name}
    path = write_adapter(scaled, output, fmt, metadata=loratool_keys("scale", params), outputs=outputs)
    values = sorted(set(weights.values()))
    if as_json:
        emit_json({"output": str(path), "format": fmt, "modules": len(weights), "weight": weight, "lbw": lbw,
                   "module_weights": weights})
    elif not quiet:
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (" …" if len(values) > 8 else "")
        click.echo(f"scaled {len(weights)} modules (weights {shown}); wrote {path} ({fmt})")
