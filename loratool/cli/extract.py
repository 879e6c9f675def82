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
from loratool.io.output import Outputs

# --to's values, spelt here so that the command loads without torch (formats.write checks them)
LAYOUTS = "kohya|diffusers|peft|aitoolkit|bfl (kohya aliases: webui, comfyui, a1111, forge, lycoris)"
TASK_TYPES = ("CAUSAL_LM", "FEATURE_EXTRACTION", "QUESTION_ANS", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS")

TARGETS = ("attn", "attn+conv", "all")


def default_output(tuned: str, rank: int, fmt: str) -> str:
    stem = Path(tuned.rstrip("/")).name.removesuffix(".safetensors")
    return f"{stem}-lora-r{rank}" + ("" if fmt == "peft" else ".safetensors")


@click.command(help="Extract a LoRA from BASE and TUNED (single-file checkpoints, diffusers folders or "
                    "component files, Hugging Face model folders; --arch generic: any two models with the "
                    "same keys, e.g. two LLM folders).")
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
@click.option("--to", "fmt", default=None, metavar="LAYOUT",
              help=f"Output layout: {LAYOUTS} (default: kohya; peft for a generic pair).")
@click.option("--deltas", type=click.Choice(("bias", "norm", "both"), case_sensitive=False), default=None,
              help="Also carry whole changes the LoRA cannot hold: bias = each extracted layer's bias change "
                   "(.diff_b), norm = the norm weights' changes (.diff), both (as Wan's distill LoRAs do).")
@click.option("--task-type", type=click.Choice(TASK_TYPES, case_sensitive=False), default=None,
              help="peft's task_type (default: from TUNED's config.json, e.g. …ForCausalLM → CAUSAL_LM).")
@click.option("--base-model-name", default=None, metavar="NAME_OR_PATH",
              help="peft's base_model_name_or_path (default: BASE's absolute path).")
@click.option("--profile", is_flag=True, help="Print where the time went (start-up, plan, read, copy, compute, "
                                              "write); always in --report.")
@device_option
@click.option("--dry-run", is_flag=True, help="Print the plan (modules, shapes, ranks, size); read no tensor.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the full per-module report as JSON here.")
@json_option
@force_option
@quiet_option
@debug_option
def command(base, tuned, rank, output, arch, targets, conv_rank, min_change, include, exclude, rank_mode, svd,
            niter, oversample, seed, dtype, clamp_quantile, fmt, deltas, task_type, base_model_name, profile, device,
            dry_run, report_path, as_json, force, quiet) -> None:
    import time
    from dataclasses import replace

    from loratool.linalg import parse_rank_mode
    from loratool.ops.extract_plan import DEFAULT_MIN_CHANGE, ExtractOptions, plan_extract
    from loratool.ops.extract_startup import start_device

    started = time.perf_counter()
    options = ExtractOptions(
        rank=rank, conv_rank=conv_rank, rank_mode=parse_rank_mode(rank_mode), targets=targets,
        arch=arch.lower() if arch else None, min_change=DEFAULT_MIN_CHANGE if min_change is None else min_change,
        include=tuple(include), exclude=tuple(exclude), policy=policy_from(svd, niter, oversample, seed),
        clamp_quantile=clamp_quantile, dtype=dtype, device=device,
        deltas=frozenset(("bias", "norm") if deltas == "both" else (deltas,) if deltas else ()))
    if dry_run:
        return _dry_run(base, tuned, options, as_json, quiet)
    device_ready = start_device(lambda: resolve_device(device))  # torch and CUDA load while we plan
    plan = plan_extract(base, tuned, options)
    options = replace(options, device=str(device_ready.result()))  # before anything else imports torch
    fmt = _layout(fmt, plan)
    if options.deltas:
        from loratool.ops.extract_deltas import check_deltas

        check_deltas(plan.arch, fmt, options.deltas)
    output = output or default_output(tuned, rank, fmt)
    outputs = Outputs([base, tuned], force=force)
    outputs.claim(output, "adapter", folder=fmt == "peft")
    if report_path:
        outputs.claim(report_path, "report")
    startup = time.perf_counter() - started
    result = _extract_with_progress(base, tuned, options, show=not (quiet or as_json), plan=plan)
    t0 = time.perf_counter()
    peft = _peft_settings(result, base, fmt, task_type, base_model_name)
    path = _write(result, output, fmt, outputs, _parameters(options, fmt), peft)
    result.profile.update(startup_s=round(startup, 4), write_s=round(time.perf_counter() - t0, 4),
                          command_s=round(time.perf_counter() - started, 4))
    full = {"output": str(path), **result.full_report()}
    if report_path:
        outputs.write_json(report_path, full, indent=1)
    if as_json:
        emit_json(full)
    elif not quiet:
        render_summary(result.summary, str(path), result.plan.arch, result.reports)
        if options.deltas:
            added = result.summary["deltas"]
            biases = sum(k.endswith(".bias") for k in added)
            click.echo(f"carried whole: {biases} bias changes (.diff_b), {len(added) - biases} norm-weight changes "
                       "(.diff)")
    if profile and not as_json:
        click.echo("profile: " + ", ".join(f"{k} {v}" for k, v in result.profile.items()), err=True)


def _layout(fmt: str | None, plan) -> str:
    """--to, else kohya for a known architecture and peft for a generic pair (an unknown model still
    gets a layout that can name its modules)."""
    if fmt is None:
        return "peft" if plan.arch == "generic" else "kohya"
    from loratool.formats.write import canonical_format

    return canonical_format(fmt)


def _peft_settings(result, base: str, fmt: str, task_type: str | None, base_model_name: str | None) -> dict:
    """write_adapter's peft arguments: embeddings in peft's embedding layout, and the adapter_config
    fields AutoPeftModel needs (task type, base model) for a generic (LLM) pair."""
    if fmt != "peft" or result.plan.arch != "generic":
        return {}
    from loratool.ops.extract_llm import peft_fields

    fields = peft_fields(base, result.plan.config, task=task_type, name=base_model_name)
    return {"peft_embeddings": result.embedding_keys, "peft_config": fields}


def _parameters(options, fmt: str) -> dict:
    return {"rank": options.rank, "conv_rank": options.conv_rank, "rank_mode": str(options.rank_mode),
            "targets": options.targets, "svd": options.policy.method, "niter": options.policy.niter,
            "oversample": options.policy.oversample, "seed": options.policy.seed,
            "clamp_quantile": options.clamp_quantile, "min_change": options.min_change, "to": fmt,
            "dtype": options.dtype,
            "include": list(options.include), "exclude": list(options.exclude), "deltas": sorted(options.deltas)}


def _write(result, output: str, fmt: str, outputs: Outputs, params: dict, peft: dict):
    from loratool.formats.write import write_adapter
    from loratool.io.metadata import loratool_keys

    meta = {**loratool_keys("extract", {**params, "arch": result.plan.arch}),
            "loratool.extract_report": result.compact_report()}
    return write_adapter(result.adapter, output, fmt, metadata=meta, outputs=outputs, **peft)


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
    from loratool.ops.extract_plan import plan_extract

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
