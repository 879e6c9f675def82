"""``loratool mix A[:w][:lbw=...] B[:w] ... -o OUT``: several adapters into one.

Thin: read the input specs (loratool.ops.inputs), mix (loratool.ops.mix), write (loratool.formats, in the
layout ``formats.output_layout`` picks: the first input's unless --to says otherwise) and render the report.
"""

from __future__ import annotations

from pathlib import Path

import click

from loratool.cli.options import (
    SPEC_HELP,
    claim_adapter_output,
    debug_option,
    device_option,
    dtype_option,
    emit_json,
    force_option,
    json_option,
    output_option,
    quiet_option,
    resolve_device,
    to_option,
    verbose_option,
)


@click.command(help="Mix adapters with weights into one: exact (concat, rank Σr), optimal at a rank (svd), "
                    f"or kohya-style factor averaging (linear). Each input is {SPEC_HELP} When the inputs come in "
                    "different layouts, the output takes the first input's layout unless --to names one.")
@click.argument("inputs", nargs=-1, required=True, metavar="A[:W][:lbw=…] B[:W] …")
@output_option()
@click.option("--mode", type=click.Choice(["concat", "svd", "linear"]), default="concat", show_default=True,
              help="concat: exact sum; svd: best rank-r approximation of the sum; linear: factor averaging.")
@click.option("-r", "--rank", type=click.IntRange(min=1), default=None,
              help="svd: output rank (default: the largest input rank). concat: caps the SVD of LoHa/LoKr/full inputs.")
@dtype_option("Output dtype (default: the inputs' when they agree, else fp32).")
@to_option
@json_option
@verbose_option
@quiet_option
@force_option
@device_option
@debug_option
def command(inputs: tuple[str, ...], output: str, mode: str, rank: int | None, dtype: str | None, to: str | None,
            as_json: bool, verbose: bool, quiet: bool, force: bool, device: str) -> None:
    from loratool.cli.render import progress
    from loratool.core.dtypes import DTYPES
    from loratool.formats import write_adapter
    from loratool.io.metadata import loratool_keys
    from loratool.ops.inputs import parse_inputs, read_inputs
    from loratool.ops.mix import mix

    specs = parse_inputs(inputs)
    items = read_inputs(specs)
    dev = resolve_device(device)
    # the first input's layout unless --to says otherwise
    fmt, output, outputs = claim_adapter_output(items[0].adapter, to, output, [s.path for s in specs], force=force,
                                                quiet=quiet)
    with progress("mix", show=not (quiet or as_json)) as bar:
        result = mix(items, mode=mode, rank=rank, dtype=DTYPES[dtype] if dtype else None,
                     device=None if dev.type == "cpu" else dev, progress=lambda n, total, _k: bar.update(n, total))
    params = {"mode": mode, "rank": rank, "inputs": [f"{Path(i.name).name}:{i.weight:g}"
                                                     + (f":lbw={i.lbw}" if i.lbw else "") for i in items]}
    result.adapter.metadata = {}
    path = write_adapter(result.adapter, output, fmt, metadata=loratool_keys("mix", params), outputs=outputs)
    _render(result, str(path), fmt, as_json=as_json, quiet=quiet, verbose=verbose)


def _render(result, output: str, fmt: str, *, as_json: bool, quiet: bool, verbose: bool) -> None:
    worst = max(result.modules, key=lambda r: r.rel_error, default=None)
    if as_json:
        emit_json({"output": output, "format": fmt, "modules": len(result.modules),
                   "max_rel_error": worst.rel_error if worst else 0.0, "warnings": result.warnings,
                   "per_module": [{"key": r.key, "inputs": r.inputs, "rank": r.rank, "method": r.method,
                                   "rel_error": r.rel_error} for r in result.modules]})
        return
    for w in result.warnings:
        click.echo(f"loratool: warning: {w}", err=True)
    if quiet:
        return
    from collections import Counter

    from loratool.cli import render as rd

    con = rd.console()
    if verbose:
        table = rd.make_table(None, ["module", "inputs", "rank", "method", "rel. error"], ("inputs", "rank", "rel. error"))
        for r in result.modules:
            table.add_row(r.key, str(r.inputs), "—" if r.rank is None else str(r.rank), r.method, f"{r.rel_error:.2e}")
        con.print(table)
    ranks = Counter(r.rank for r in result.modules if r.rank is not None)
    methods = Counter(r.method for r in result.modules)
    rank_text = ", ".join(f"{r} ×{n}" for r, n in sorted(ranks.items())) if len(ranks) > 1 else str(next(iter(ranks), "—"))
    rows = [("modules", f"{len(result.modules)} ({', '.join(f'{m} {n}' for m, n in sorted(methods.items()))})"),
            ("rank", rank_text),
            ("largest rel. error", "0 (exact)" if not worst or worst.rel_error == 0 else
             f"{worst.rel_error:.3g} ({worst.key})")]
    con.print(rd.key_value_table(rows))
    con.print(f"wrote {output} ({fmt})" + ("" if verbose else "; -v lists every module"))
