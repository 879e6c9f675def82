"""``loratool extract BASE TUNED -r 32``: a LoRA from the difference of two models.

Thin: parse options, call :mod:`loratool.ops.extract`, write through :mod:`loratool.formats`, render.
"""

from __future__ import annotations

from pathlib import Path

import click

from loratool.cli.options import (
    debug_option,
    device_option,
    emit_json,
    force_option,
    json_option,
    policy_from,
    quiet_option,
    resolve_device,
    svd_options,
)
from loratool.cli.render import render_summary
from loratool.formats.write import FORMATS
from loratool.io.output import Outputs

TARGETS = ("attn", "attn+conv", "all")


def default_output(tuned: str, rank: int, fmt: str) -> str:
    stem = Path(tuned.rstrip("/")).name.removesuffix(".safetensors")
    return f"{stem}-lora-r{rank}" + ("" if fmt == "peft" else ".safetensors")


@click.command(help="Extract a LoRA from BASE and TUNED (single-file checkpoints, diffusers folders or "
                    "component files; --arch generic: any two safetensors with the same keys).")
@click.argument("base", type=click.Path(exists=True, dir_okay=True))
@click.argument("tuned", type=click.Path(exists=True, dir_okay=True))
@click.option("-r", "--rank", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rank (the cap with a dynamic --rank-mode).")
@click.option("-o", "--output", type=click.Path(dir_okay=True), default=None,
              help="Output file (a folder for --to peft). Default: <TUNED>-lora-r<RANK>.safetensors here.")
@click.option("--arch", default=None, metavar="sd1|sd2|sdxl|flux|sd3|generic", help="Override detection.")
@click.option("--targets", type=click.Choice(TARGETS), default="attn", show_default=True,
              help="attn: transformer blocks (kohya's default); attn+conv: LoCon; all: every layer.")
@click.option("--conv-rank", type=click.IntRange(min=1), default=None, help="Rank of k×k convs (default: -r).")
@click.option("--min-change", type=click.FloatRange(min=0), default=None,
              help="Text-encoder modules whose ‖ΔW‖/‖W‖ is below this are skipped (default 2e-3).")
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules whose key matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Drop modules whose key matches (repeatable).")
@svd_options
@click.option("--clamp-quantile", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Clamp factors at this quantile of their entries (kohya's 0.99; off by default).")
@click.option("--to", "fmt", type=click.Choice(FORMATS, case_sensitive=False), default=None,
              help="Output layout (default: kohya; peft for a generic pair).")
@device_option
@click.option("--dry-run", is_flag=True, help="Print the plan (modules, shapes, ranks, size); read no tensor.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the full per-module report as JSON here.")
@json_option
@force_option
@quiet_option
@debug_option
def command(base, tuned, rank, output, arch, targets, conv_rank, min_change, include, exclude, rank_mode, svd,
            niter, oversample, seed, dtype, clamp_quantile, fmt, device, dry_run, report_path, as_json, force,
            quiet) -> None:
    from loratool.linalg import parse_rank_mode
    from loratool.ops.extract_plan import DEFAULT_MIN_CHANGE, ExtractOptions

    dev = resolve_device(device)
    options = ExtractOptions(
        rank=rank, conv_rank=conv_rank, rank_mode=parse_rank_mode(rank_mode), targets=targets,
        arch=arch.lower() if arch else None, min_change=DEFAULT_MIN_CHANGE if min_change is None else min_change,
        include=tuple(include), exclude=tuple(exclude), policy=policy_from(svd, niter, oversample, seed),
        clamp_quantile=clamp_quantile, dtype=dtype, device=str(dev))
    if dry_run:
        return _dry_run(base, tuned, options, as_json, quiet)
    plan = None
    if fmt is None:
        fmt, plan = _default_format(base, tuned, options)
    fmt = fmt.lower()
    output = output or default_output(tuned, rank, fmt)
    outputs = Outputs([base, tuned], force=force)
    outputs.claim(output, "adapter", folder=fmt == "peft")
    if report_path:
        outputs.claim(report_path, "report")
    result = _extract_with_progress(base, tuned, options, show=not (quiet or as_json), plan=plan)
    path = _write(result, output, fmt, outputs, _parameters(options, fmt))
    full = {"output": str(path), **result.full_report()}
    if report_path:
        outputs.write_json(report_path, full, indent=1)
    if as_json:
        emit_json(full)
    elif not quiet:
        render_summary(result.summary, str(path), result.plan.arch, result.reports)


def _default_format(base: str, tuned: str, options):
    """(layout, plan): kohya for a known architecture, peft for a generic pair (detected from the
    headers when --arch is not given, so an unknown model still gets a layout that can name its
    modules; the plan made for that is handed on to the extraction, which then does not plan again)."""
    plan = None
    arch = options.arch
    if arch is None:
        from loratool.ops.extract import plan_extract

        plan = plan_extract(base, tuned, options)
        arch = plan.arch
    return ("peft" if arch == "generic" else "kohya"), plan


def _parameters(options, fmt: str) -> dict:
    return {"rank": options.rank, "conv_rank": options.conv_rank, "rank_mode": str(options.rank_mode),
            "targets": options.targets, "svd": options.policy.method, "niter": options.policy.niter,
            "oversample": options.policy.oversample, "seed": options.policy.seed,
            "clamp_quantile": options.clamp_quantile, "min_change": options.min_change, "to": fmt,
            "dtype": options.dtype,
            "include": list(options.include), "exclude": list(options.exclude)}


def _write(result, output: str, fmt: str, outputs: Outputs, params: dict):
    from loratool.formats.write import write_adapter
    from loratool.io.metadata import loratool_keys

    meta = {**loratool_keys("extract", {**params, "arch": result.plan.arch}),
            "loratool.extract_report": result.compact_report()}
    return write_adapter(result.adapter, output, fmt, metadata=meta, outputs=outputs)


def _extract_with_progress(base: str, tuned: str, options, show: bool, plan=None):
    from loratool.cli.render import console
    from loratool.ops.extract import extract

    if not show or not console(stderr=True).is_terminal:
        return extract(base, tuned, options, plan=plan)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        task = bar.add_task("extract", total=None, rate="")

        def update(done: int, total: int, _key: str) -> None:
            speed = bar.tasks[0].speed
            bar.update(task, completed=done, total=total, rate=f"{speed:.1f} mod/s" if speed else "")

        return extract(base, tuned, options, progress=update, plan=plan)


def _dry_run(base: str, tuned: str, options, as_json: bool, quiet: bool) -> None:
    from loratool.ops.extract import plan_extract

    plan = plan_extract(base, tuned, options)
    size = plan.output_bytes(4 if options.dtype == "fp32" else 2)
    data = {"arch": plan.arch, "modules": [{"key": m.key, "shape": list(m.shape), "rank": m.rank}
                                           for m in plan.modules],
            "excluded": plan.excluded, "not_in_inputs": len(plan.missing), "output_bytes_at_most": size,
            "rank_mode": str(options.rank_mode),
            "note": "text-encoder modules below --min-change and unchanged modules are skipped at run time"}
    if as_json:
        return emit_json(data)
    if quiet:
        return None
    from rich.table import Table

    from loratool.cli.render import console, fmt_bytes

    table = Table(title=f"extract plan: {plan.arch}, {len(plan.modules)} modules, rank mode {options.rank_mode}")
    for col in ("module", "shape", "rank"):
        table.add_column(col)
    for m in plan.modules:
        table.add_row(m.key, "×".join(map(str, m.shape)), str(m.rank))
    con = console()
    con.print(table)
    con.print(f"output ≤ {fmt_bytes(size)}; excluded {len(plan.excluded)}; table modules not in the inputs "
              f"{len(plan.missing)}; {data['note']}")
    return None
