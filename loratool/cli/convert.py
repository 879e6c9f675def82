"""``loratool convert IN --to FORMAT -o OUT``: rewrite an adapter in another layout.

Thin: read (loratool.formats), decide (loratool.ops.convert), set metadata (ops.convert_meta),
write (loratool.formats) and render the report. Token embeddings carried in the input
(cloneofsimo, pivotal tuning) are written beside the output as textual-inversion files
(loratool.ops.embeddings). Every output is claimed before the work starts (loratool.io.output).
"""

from __future__ import annotations

from pathlib import Path

import click

from loratool.arch import family_names, retargets
from loratool.cli.options import (
    adapter_output,
    debug_option,
    dtype_option,
    emit_json,
    force_option,
    json_option,
    output_option,
    quiet_option,
    verbose_option,
)
from loratool.errors import LoraToolError, ModulesSkipped
from loratool.io.output import Outputs
from loratool.ops.convert_targets import DEFAULT_ENERGY, DEFAULT_RANK_CAP, FORMAT_CHOICES


@click.command(help="Rewrite an adapter in another layout: exact where only names change, lossy only when "
                    "asked (--rank/--lossy) and then measured.")
@click.argument("input_path", metavar="IN", type=click.Path(exists=True, dir_okay=True))
@click.option("--to", "to", required=True, type=click.Choice(FORMAT_CHOICES, case_sensitive=False),
              help="Output layout (webui/comfyui/a1111/forge are kohya).")
@output_option(required=False)
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Turn LoHa/LoKr/full/etc. into plain LoRA at this rank (lossy, measured).")
@click.option("--lossy", is_flag=True, help=f"Allow the SVD lowering at the smallest rank keeping "
                                           f"{DEFAULT_ENERGY:.1%} of ‖ΔW‖_F (at most --rank-cap).")
@click.option("--rank-cap", type=click.IntRange(min=1), default=DEFAULT_RANK_CAP, show_default=True,
              help="--lossy: the highest rank a module may get.")
@click.option("--drop-unknown", is_flag=True, help="Convert what can be and list what was dropped.")
@click.option("--dry-run", is_flag=True, help="Print the mapping and what would be lost; write nothing.")
@dtype_option("Cast tensors (default: keep).")
@click.option("--arch", default=None, type=click.Choice(family_names(), case_sensitive=False),
              help="The model family, when the keys fit several (Flux or Chroma) or none.")
@click.option("--retarget", default=None, type=click.Choice(sorted(retargets()), case_sensitive=False),
              help="Leave out, and list, the modules a sibling model lacks (wan-t2v: Wan's image-to-video layers; "
                   "chroma: Flux's modulation).")
@json_option
@verbose_option
@force_option
@quiet_option
@debug_option
def command(input_path: str, to: str, output: str | None, rank: int | None, lossy: bool, rank_cap: int,
            drop_unknown: bool, dry_run: bool, dtype: str | None, arch: str | None, retarget: str | None,
            as_json: bool, verbose: bool, force: bool, quiet: bool) -> None:
    from loratool.cli.render import progress
    from loratool.core.dtypes import DTYPES
    from loratool.formats import canonical_format, read_adapter, write_adapter
    from loratool.ops.convert import convert
    from loratool.ops.convert_meta import target_metadata
    from loratool.ops.embeddings import embedding_paths

    if output is None and not dry_run:
        raise click.UsageError("-o/--output is required (or --dry-run)")
    outputs = Outputs([input_path], force=force)
    if not dry_run:
        output = adapter_output(output, canonical_format(to))
        outputs.claim(output, "adapter", folder=canonical_format(to) == "peft")
    source = read_adapter(input_path, arch=arch)
    if not source.modules and not source.unknown:  # broken modules: convert names them (or drops them)
        raise LoraToolError("holds no adapter modules: nothing to convert", input_path)
    token_files = {} if dry_run else embedding_paths(Path(output), sorted(source.embeddings))
    for token, path in token_files.items():
        outputs.claim(path, f"embedding of {token}")
    try:
        with progress("convert", len(source.modules), show=not (quiet or as_json)) as bar:
            result, report = convert(source, to, rank=rank, lossy=lossy, rank_cap=rank_cap,
                                     drop_unknown=drop_unknown, dtype=DTYPES[dtype] if dtype else None,
                                     retarget=retarget,
                                     progress=lambda done, total, _key: bar.update(done, total))
    except LoraToolError as e:
        raise LoraToolError(e.message, input_path) from None
    params = {"to": report.target, "rank": rank, "lossy": lossy, "rank_cap": rank_cap, "dtype": dtype,
              "drop_unknown": drop_unknown, "input": Path(input_path).name}
    title = Path(output).stem if output else None
    meta = target_metadata(source.metadata, result, report, parameters=params, title=title)
    if dry_run:
        mapping = _mapping(result, report.target)
        _render(report, mapping, output, {}, as_json=as_json, quiet=quiet, dry_run=True, verbose=verbose)
        return
    write_adapter(result, output, report.target, metadata=meta, outputs=outputs)
    embeddings = _write_embeddings(outputs, result.embeddings, token_files, result.base_model)
    _render(report, None, str(Path(output)), embeddings, as_json=as_json, quiet=quiet, dry_run=False,
            verbose=verbose)
    if report.dropped:  # written without them, as --drop-unknown allowed: listed on stderr, exit 3
        raise ModulesSkipped(report.dropped, "--drop-unknown")


def _write_embeddings(outputs: Outputs, embeddings: dict, paths: dict[str, Path], base_model: str) -> dict[str, str]:
    """One textual-inversion file per token, at the path claimed for it."""
    from loratool.io.metadata import loratool_keys
    from loratool.ops.embeddings import textual_inversion

    written = {}
    for token, path in paths.items():
        meta = {"loratool.token": token, "loratool.base_model": base_model, **loratool_keys("convert")}
        outputs.write_safetensors(path, textual_inversion(embeddings[token]), meta)
        written[token] = str(path)
    return written


def _mapping(result, target: str) -> dict[str, list[str]]:
    """Canonical module key -> the tensor keys the target file will hold for it."""
    from loratool.core.modules import Adapter
    from loratool.formats import encode

    out = {}
    for key, module in result.modules.items():
        one = Adapter(base_model=result.base_model, source_format=target)
        one.add(module)
        tensors, _ = encode(one, target)
        out[key] = sorted(tensors)
    return out


def _render(report, mapping, output, embeddings, *, as_json: bool, quiet: bool, dry_run: bool,
            verbose: bool) -> None:
    if as_json:
        data = {"output": output, "dry_run": dry_run, **report.to_json(), "embedding_files": embeddings}
        if mapping is not None:
            data["mapping"] = mapping
        emit_json(data)
        return
    if quiet:
        return
    from loratool.cli.render import console

    con = console()
    counts = ", ".join(f"{n} {a}" for a, n in sorted(report.counts().items()))
    verb = "would convert" if dry_run else "converted"
    con.print(f"{verb} {report.source_format} → {report.target}: {counts}", highlight=False)
    if report.lossy:
        worst = max(report.lossy, key=lambda c: c.rel_error)
        n = len(report.lossy)
        con.print(f"lossy: {n} module{'s' if n != 1 else ''} made LoRA by a truncated SVD of ΔW; largest relative error "
                  f"‖ΔW'−ΔW‖/‖ΔW‖ {worst.rel_error:.3e} ({worst.key})", highlight=False)
        if verbose:
            for c in report.lossy:
                con.print(f"  {c.rel_error:.3e}  r={c.rank_out:<4} {c.kind:<5} {c.key}", highlight=False)
    if dry_run:  # a real run lists them on stderr (ModulesSkipped)
        for key, why in report.dropped:
            con.print(f"[yellow]would drop[/] {key}: {why}", highlight=False)
    for key, why in report.retargeted:
        con.print(f"[yellow]left out[/] {key}: {why}", highlight=False)
    for note in report.notes:
        con.print(note, highlight=False)
    if mapping is not None and verbose:
        actions = {c.key: c.action for c in report.changes}
        for key, keys in mapping.items():
            con.print(f"  {key}  [{actions.get(key, 'fuse/split')}] → {', '.join(keys)}", highlight=False,
                      markup=False)
    for token, path in embeddings.items():
        con.print(f"token embedding {token} → {path}", highlight=False)
    if output and not dry_run:
        con.print(f"wrote {output}", highlight=False)
    if not verbose and (report.lossy or mapping is not None):
        con.print("-v lists every module", highlight=False)
