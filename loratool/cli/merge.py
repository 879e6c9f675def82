"""``loratool merge CHECKPOINT LORA[:w] ... -o OUT``: bake adapters into a checkpoint, streamed."""

from __future__ import annotations

from pathlib import Path

import click

from loratool.cli.options import (
    SPEC_HELP,
    arch_option,
    debug_option,
    device_option,
    emit_json,
    force_option,
    json_option,
    quiet_option,
    resolve_device,
    verbose_option,
)
from loratool.errors import ModulesSkipped


def _total_bytes(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


@click.command(help="Bake adapters into a single-file checkpoint (LDM/SGM/BFL) or a diffusers folder: "
                    f"W ← W + w·ΔW, streamed, dtype kept. Each LORA is {SPEC_HELP}")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=True))
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:W][:lbw=…] …")
@click.option("-o", "--output", type=click.Path(dir_okay=True), default=None,
              help="Output file (a folder for a diffusers input).")
@arch_option("The checkpoint's model family (default: detected from its keys).")
@click.option("--allow-unmatched", is_flag=True, help="Skip LoRA modules that match no checkpoint weight.")
@click.option("--dry-run", is_flag=True, help="Show matched/unmatched counts; write nothing.")
@json_option
@verbose_option
@quiet_option
@force_option
@device_option
@debug_option
def command(checkpoint: str, loras: tuple[str, ...], output: str | None, arch: str | None, allow_unmatched: bool,
            dry_run: bool, as_json: bool, verbose: bool, quiet: bool, force: bool, device: str) -> None:
    from loratool.cli.render import progress
    from loratool.io.output import Outputs
    from loratool.ops.inputs import parse_inputs, read_inputs
    from loratool.ops.merge_stream import merge_checkpoint

    if output is None and not dry_run:
        raise click.UsageError("-o/--output is required (or --dry-run)")
    specs = parse_inputs(loras)
    outputs = Outputs([checkpoint, *(s.path for s in specs)], force=force)
    if not dry_run:
        outputs.claim(output, "merged checkpoint", folder=Path(checkpoint).is_dir())
    items = read_inputs(specs)
    dev = resolve_device(device)
    kwargs = dict(arch=arch, allow_unmatched=allow_unmatched, dry_run=dry_run, outputs=outputs,
                  device=None if dev.type == "cpu" else dev)
    with progress("merge", _total_bytes(Path(checkpoint)), in_bytes=True,
                  show=not (dry_run or as_json or quiet)) as bar:
        report = merge_checkpoint(checkpoint, items, output, progress=bar.advance, **kwargs)
    report["dry_run"] = dry_run
    if as_json:
        emit_json(report)
    elif not quiet:
        _render(report, dry_run, verbose)
    if report["unmatched"] and not dry_run:  # written without them, as --allow-unmatched allowed: exit 3
        raise ModulesSkipped([(n, "matches no weight of the checkpoint") for n in report["unmatched"]],
                             "--allow-unmatched")


def _render(report: dict, dry_run: bool, verbose: bool) -> None:
    click.echo(f"arch {report['arch']}: {report['matched_modules']} LoRA modules matched, "
               f"{report['unmatched_modules']} unmatched, {report['tensors_changed']} checkpoint tensors to change")
    if dry_run:  # a real run lists them on stderr (ModulesSkipped)
        unmatched = report["unmatched"]
        for name in unmatched if verbose else unmatched[:2]:
            click.echo(f"  unmatched: {name}")
        if len(unmatched) > 2 and not verbose:
            click.echo(f"  … and {len(unmatched) - 2} more (-v lists them)")
    else:
        click.echo(f"wrote {report['output']}")
