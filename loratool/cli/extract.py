"""``loratool extract BASE TUNED -r 32``: a LoRA from the difference of two models.

Thin: parse options, call :mod:`loratool.ops.extract`, write through :mod:`loratool.formats`, render.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from loratool.cli.options import (
    LayoutChoice,
    adapter_output,
    arch_option,
    debug_option,
    device_option,
    emit_json,
    force_option,
    json_option,
    policy_from,
    quiet_option,
    resolve_device,
    svd_options,
    targets_option,
    verbose_option,
)
from loratool.cli.render import render_summary
from loratool.io.output import Outputs

TASK_TYPES = ("CAUSAL_LM", "FEATURE_EXTRACTION", "QUESTION_ANS", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS")


def default_output(tuned: str, rank: int, fmt: str) -> str:
    stem = Path(tuned.rstrip("/")).name.removesuffix(".safetensors")
    return f"{stem}-lora-r{rank}" + ("" if fmt == "peft" else ".safetensors")


@click.command(help="Extract a LoRA from BASE and TUNED (single-file checkpoints, diffusers folders or "
                    "component files, Hugging Face model folders; --arch generic: any two models with the "
                    "same keys, e.g. two LLM folders).\n\n"
                    "The output: a diffusion model's LoRA is one kohya .safetensors file (what ComfyUI, "
                    "A1111 and Forge load); a generic or LLM pair's is a peft folder (what peft and "
                    "transformers load). --to chooses another layout.")
@click.argument("base", type=click.Path(exists=True, dir_okay=True))
@click.argument("tuned", type=click.Path(exists=True, dir_okay=True))
@click.option("-r", "--rank", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rank (the cap with a dynamic --rank-mode); a layer narrower than it gets min(out, in).")
@click.option("-o", "--output", type=click.Path(dir_okay=True), default=None,
              help="Output file, or folder for peft (default: <TUNED>-lora-r<RANK>.safetensors here for a "
                   "diffusion model, the folder <TUNED>-lora-r<RANK> for a generic pair).")
@arch_option("The model family (default: detected from the headers).")
@targets_option("transformer", "Which layers of a known model (a generic pair: every weight; --include/"
                               "--exclude choose): ")
@click.option("--conv-rank", type=click.IntRange(min=1), default=None, help="Rank of k×k convs (default: -r).")
@click.option("--min-change", type=click.FloatRange(min=0), default=None,
              help="Text-encoder modules whose ‖ΔW‖/‖W‖ is below this are skipped (default 2e-3).")
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules whose key matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Drop modules whose key matches (repeatable).")
@svd_options
@click.option("--clamp-quantile", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Clamp factors at this quantile of their entries (kohya's 0.99; off by default).")
@click.option("--to", "fmt", type=LayoutChoice(), default=None,
              help="Output layout (default: kohya for a diffusion model, peft for a generic pair).")
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
@verbose_option
@force_option
@quiet_option
@debug_option
@click.pass_context
def command(ctx, base, tuned, rank, output, arch, targets, conv_rank, min_change, include, exclude, rank_mode, svd,
            niter, oversample, seed, dtype, clamp_quantile, fmt, deltas, task_type, base_model_name, profile, device,
            dry_run, report_path, as_json, verbose, force, quiet) -> None:
    import time
    from dataclasses import replace

    from loratool.linalg import parse_rank_mode
    from loratool.ops.extract_plan import DEFAULT_MIN_CHANGE, ExtractOptions, plan_extract
    from loratool.ops.extract_startup import start_device

    started = time.perf_counter()
    options = ExtractOptions(
        rank=rank, conv_rank=conv_rank, rank_mode=parse_rank_mode(rank_mode), targets=targets,
        arch=arch, min_change=DEFAULT_MIN_CHANGE if min_change is None else min_change,
        include=tuple(include), exclude=tuple(exclude), policy=policy_from(svd, niter, oversample, seed),
        clamp_quantile=clamp_quantile, dtype=dtype, device=device,
        deltas=frozenset(("bias", "norm") if deltas == "both" else (deltas,) if deltas else ()))
    device_ready = None if dry_run else start_device(lambda: resolve_device(device))  # torch loads while we plan
    # headers only; the extraction takes this plan, and a cold disk starts on its weights while torch loads
    plan = plan_extract(base, tuned, options, advise=not dry_run)
    if not quiet:  # stderr: --json keeps stdout clean
        for note in _notes(ctx, plan, options):
            click.echo(f"loratool: note: {note}", err=True)
    if dry_run:
        return _dry_run(plan, options, as_json, quiet, verbose)
    fmt = fmt or ("peft" if plan.arch == "generic" else "kohya")  # --to is a layout's name already
    _check_layout_holds(fmt, plan)
    output = adapter_output(output or default_output(tuned, rank, fmt), fmt)
    options = replace(options, device=str(device_ready.result()))  # before anything else imports torch
    if options.deltas:
        from loratool.ops.extract_deltas import check_deltas

        check_deltas(plan.arch, fmt, options.deltas)
    outputs = Outputs([base, tuned], force=force)
    outputs.claim(output, "adapter", folder=fmt == "peft")
    if report_path:
        outputs.claim(report_path, "report")
    startup = time.perf_counter() - started
    result, path = _extract_with_progress(base, tuned, options, output, fmt, outputs, plan,
                                          show=not (quiet or as_json), metadata=_metadata(options, fmt, plan.arch),
                                          writer_args=lambda r: _peft_settings(r, base, fmt, task_type,
                                                                               base_model_name))
    result.profile.update(startup_s=round(startup, 4), command_s=round(time.perf_counter() - started, 4))
    full = {"output": str(path), **result.full_report()}
    if report_path:
        outputs.write_json(report_path, full, indent=1)
    if as_json:
        emit_json(full)
    elif not quiet:
        render_summary(result.summary, str(path), result.plan.arch, result.reports, verbose=verbose)
        if options.deltas:
            added = result.summary["deltas"]
            biases = sum(k.endswith(".bias") for k in added)
            click.echo(f"carried whole: {biases} bias changes (.diff_b), {len(added) - biases} norm-weight changes "
                       "(.diff)")
    if profile and not as_json:
        click.echo("profile: " + ", ".join(f"{k} {v}" for k, v in result.profile.items()), err=True)
    return None


def _peft_settings(result, base: str, fmt: str, task_type: str | None, base_model_name: str | None) -> dict:
    """write_adapter's peft arguments: embeddings in peft's embedding layout, and the adapter_config
    fields AutoPeftModel needs (task type, base model) for a generic (LLM) pair."""
    if fmt != "peft" or result.plan.arch != "generic":
        return {}
    from loratool.ops.extract_llm import peft_fields

    fields = peft_fields(base, result.plan.config, task=task_type, name=base_model_name)
    return {"peft_embeddings": result.embedding_keys, "peft_config": fields}


def _notes(ctx: click.Context, plan, options) -> list[str]:
    """What a careful user should know before the work starts: layers narrower than the rank asked for (they
    get their full rank), and --targets on a generic pair (every weight is taken)."""
    notes = []
    narrow = [m for m in plan.modules if m.rank < _asked(m, options)]
    if narrow:
        example = min(narrow, key=lambda m: m.rank)
        ranks = sorted({m.rank for m in narrow})
        notes.append(f"{len(narrow)} of {len(plan.modules)} layers are narrower than the rank asked for: each "
                     f"gets its full rank min(out, in) ({', '.join(map(str, ranks[:6]))}{' …' if len(ranks) > 6 else ''}"
                     f"; e.g. {example.key} {'×'.join(map(str, example.shape))} -> rank {example.rank}), which "
                     "stores more than the layer's own weights")
    given = ctx.get_parameter_source("targets") not in (None, click.core.ParameterSource.DEFAULT)
    if plan.arch == "generic" and given:
        notes.append(f"--targets {options.targets} names layers of a known model family; a generic pair gives "
                     "every weight both files hold (--include/--exclude choose)")
    return notes


def _check_layout_holds(fmt: str, plan) -> None:
    """--to names a layout that cannot hold every planned module: say so before any work (the writer would
    refuse it at the end)."""
    from loratool.errors import LoraToolError
    from loratool.formats.layouts import layout

    spec = layout(fmt)
    outside = sorted({m.component for m in plan.modules if not spec.holds_component(m.component)})
    if outside:
        hint = f", or --exclude {outside[0]} leaves them out" if plan.arch != "generic" else ""
        raise LoraToolError(f"the {spec.name} layout holds {', '.join(sorted(spec.components or ()))} modules only, "
                            f"not {', '.join(outside)}: --to kohya or peft holds every component{hint}")


def _asked(module, options) -> int:
    kxk = len(module.shape) == 4 and math.prod(module.shape[2:]) > 1
    return options.conv_rank if (kxk and options.conv_rank) else options.rank


def _parameters(options, fmt: str, arch: str) -> dict:
    """``loratool.parameters`` of the output: the settings as they took effect (a generic pair takes every
    weight: its targets are ``all``)."""
    return {"rank": options.rank, "conv_rank": options.conv_rank, "rank_mode": str(options.rank_mode),
            "targets": "all" if arch == "generic" else options.targets, "svd": options.policy.method,
            "niter": options.policy.niter, "oversample": options.policy.oversample, "seed": options.policy.seed,
            "clamp_quantile": options.clamp_quantile, "min_change": options.min_change, "to": fmt,
            "dtype": options.dtype, "include": list(options.include), "exclude": list(options.exclude),
            "deltas": sorted(options.deltas)}


def _metadata(options, fmt: str, arch: str) -> dict[str, str]:
    """The output's ``loratool.*`` keys (the extraction report is added when it is known)."""
    from loratool.io.metadata import loratool_keys

    return loratool_keys("extract", {**_parameters(options, fmt, arch), "arch": arch})


def _extract_with_progress(base: str, tuned: str, options, output: str, fmt: str, outputs: Outputs, plan, *,
                           show: bool, metadata: dict[str, str], writer_args):
    from loratool.cli.render import progress
    from loratool.ops.extract_write import extract_to

    with progress("extract", len(plan.modules), show=show) as bar:
        return extract_to(base, tuned, options, output, fmt, outputs, metadata=metadata, plan=plan,
                          progress=lambda done, total, _key: bar.update(done, total), writer_args=writer_args)


def _dry_run(plan, options, as_json: bool, quiet: bool, verbose: bool) -> None:
    from collections import Counter

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
    from loratool.cli import render as rd

    con = rd.console()
    if verbose:
        table = rd.make_table(None, ["module", "shape", "rank"], ("rank",))
        for m in plan.modules:
            table.add_row(m.key, "×".join(map(str, m.shape)), str(m.rank))
        con.print(table)
    comps = Counter(m.component if m.component != "model" else "model" for m in plan.modules)
    ranks = Counter(m.rank for m in plan.modules)
    rows = [("modules", f"{len(plan.modules)} ({', '.join(f'{c} {n}' for c, n in comps.items())})"),
            ("ranks", ", ".join(f"{r} ×{n}" for r, n in sorted(ranks.items())) if len(ranks) > 1
             else str(next(iter(ranks)))),
            ("rank mode", str(options.rank_mode)), ("output", f"≤ {rd.fmt_bytes(size)}"),
            ("excluded", str(len(plan.excluded))), ("table modules not in the inputs", str(len(plan.missing)))]
    con.print(rd.key_value_table(rows, title=f"extract plan: {plan.arch}, targets {options.targets}"))
    con.print(data["note"] + ("" if verbose else "; -v lists every module"))
    return None
