"""``loratool resize IN -r 16 -o OUT``: lower an adapter's ranks on its factors (no dense ΔW for LoRA).

Thin: read (loratool.formats), resize (loratool.ops.resize), write (loratool.formats), render.
"""

from __future__ import annotations

import json

import click

from loratool.cli.options import (
    claim_adapter_output,
    debug_option,
    device_option,
    emit_json,
    force_option,
    json_option,
    output_option,
    policy_from,
    quiet_option,
    resolve_device,
    svd_options,
    to_option,
    verbose_option,
)
from loratool.cli.render import progress, render_summary
from loratool.errors import LoraToolError, about


@click.command(help="Resize an adapter's ranks: QR of each factor and an SVD of the small core, so the dense "
                    "ΔW is never built for LoRA/LoCon; the scale alpha/rank is kept.")
@click.argument("input_path", metavar="IN", type=click.Path(exists=True, dir_okay=True))
@click.option("-r", "--rank", type=click.IntRange(min=1), required=True, help="New rank (the cap with --rank-mode).")
@click.option("--conv-rank", type=click.IntRange(min=1), default=None, help="Rank of k×k convs (default: -r).")
@output_option()
@svd_options
@to_option
@device_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the per-module report as JSON here.")
@json_option
@verbose_option
@force_option
@quiet_option
@debug_option
def command(input_path, rank, conv_rank, output, rank_mode, svd, niter, oversample, seed, dtype, to, device,
            report_path, as_json, verbose, force, quiet) -> None:
    from loratool.formats import read_adapter, require_complete
    from loratool.formats.write import write_adapter
    from loratool.io.metadata import loratool_keys
    from loratool.linalg import parse_rank_mode
    from loratool.ops.resize import ResizeOptions, resize

    options = ResizeOptions(rank=rank, conv_rank=conv_rank, rank_mode=parse_rank_mode(rank_mode),
                            policy=policy_from(svd, niter, oversample, seed), dtype=dtype,
                            device=str(resolve_device(device)))
    source = read_adapter(input_path)
    require_complete(source, input_path)
    if not source.modules:
        raise LoraToolError("holds no adapter modules: nothing to resize", input_path)
    fmt, output, outputs = claim_adapter_output(source, to, output, [input_path], force=force, quiet=quiet)
    if report_path:
        outputs.claim(report_path, "report")
    with about(input_path), progress("resize", len(source.modules), show=not (quiet or as_json)) as bar:
        # a module's math fails naming the module: about() adds the file
        result = resize(source, options, progress=lambda done, total, _key: bar.update(done, total))
    params = {"rank": rank, "conv_rank": conv_rank, "rank_mode": str(options.rank_mode), "dtype": dtype,
              "to": fmt.lower()}
    per = {r.key: [r.old_rank, r.rank, round(r.retained, 6)] for r in result.reports}
    meta = {**loratool_keys("resize", params),
            "loratool.resize_report": json.dumps({"summary": {k: v for k, v in result.summary.items()
                                                              if not isinstance(v, list) or len(v) <= 8},
                                                  "modules": per}, sort_keys=True, separators=(",", ":")),
            "ss_training_comment": f"resized by loratool to rank {rank} ({options.rank_mode})"}
    path = write_adapter(result.adapter, output, fmt.lower(), metadata=meta, outputs=outputs)
    full = {"output": str(path), "summary": result.summary, "modules": [r.as_dict() for r in result.reports]}
    if report_path:
        outputs.write_json(report_path, full, indent=1)
    if as_json:
        emit_json(full)
    elif not quiet:
        summary = {**result.summary, "skipped_unchanged": [], "skipped_below_min_change": [], "excluded": []}
        render_summary(summary, str(path), source.base_model, result.reports, verbose=verbose)
