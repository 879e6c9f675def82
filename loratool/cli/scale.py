"""``loratool scale IN WEIGHT -o OUT [--lbw BLOCKS]``: change an adapter's strength exactly."""

from __future__ import annotations

from pathlib import Path

import click

from loratool.cli.options import (
    arch_option,
    claim_adapter_output,
    debug_option,
    emit_json,
    force_option,
    json_option,
    output_option,
    quiet_option,
    to_option,
)


@click.command(help="Scale an adapter's strength exactly (ΔW → w·ΔW): alpha where the file stores it, else one "
                    "factor; --lbw scales per block. A negative WEIGHT may need `--` before it.",
               context_settings={"ignore_unknown_options": True})
@click.argument("input_path", metavar="IN", type=click.Path(exists=True, dir_okay=True))
@click.argument("weight", type=float)
@output_option()
@click.option("--lbw", default=None, metavar="BLOCKS",
              help="Block weights: a preset (ALL, INS, MIDD, OUTD, …) or 12/17/20/26 comma-separated numbers.")
@arch_option("Base model for --lbw when the file does not say.", with_generic=False)
@to_option
@json_option
@quiet_option
@force_option
@debug_option
def command(input_path: str, weight: float, output: str, lbw: str | None, arch: str | None, to: str | None,
            as_json: bool, quiet: bool, force: bool) -> None:
    from loratool.formats import read_adapter, write_adapter
    from loratool.io.metadata import loratool_keys
    from loratool.ops.scale import scale

    adapter = read_adapter(input_path)
    fmt, output, outputs = claim_adapter_output(adapter, to, output, [input_path], force=force, quiet=quiet)
    scaled, weights = scale(adapter, weight, lbw, arch_name=arch, path=input_path)
    if not quiet and not as_json:
        _note_missing_alphas(adapter, weights, input_path)
    params = {"weight": weight, "lbw": lbw, "input": Path(input_path).name}
    path = write_adapter(scaled, output, fmt, metadata=loratool_keys("scale", params), outputs=outputs)
    values = sorted(set(weights.values()))
    if as_json:
        emit_json({"output": str(path), "format": fmt, "modules": len(weights), "weight": weight, "lbw": lbw,
                   "module_weights": weights})
    elif not quiet:
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (" …" if len(values) > 8 else "")
        click.echo(f"scaled {len(weights)} modules (weights {shown}); wrote {path} ({fmt})")


def _note_missing_alphas(adapter, weights: dict[str, float], path: str) -> None:
    """A file without alphas is applied at scale 1 by every loader; scaling it changes a factor's values
    (in their own precision) instead of one number. Say so, once."""
    bare = [k for k, m in adapter.modules.items() if m.alpha is None and m.kind != "norm" and weights[k] != 1.0]
    if bare:
        click.echo(f"loratool: note: {path} stores no alpha for {len(bare)} of {len(adapter.modules)} modules "
                   "(loaders apply those at scale 1): their strength is multiplied into a factor, rounded to its "
                   "dtype; `loratool inspect` shows the scale each module has", err=True)
