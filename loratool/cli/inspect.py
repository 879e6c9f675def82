"""``loratool inspect FILE...``: what an adapter file holds, as a rich summary or JSON."""

from __future__ import annotations

import click

from loratool.cli import render as rd
from loratool.cli.options import debug_option, debugging, emit_json, force_option, json_option
from loratool.errors import LoraToolError
from loratool.io.output import Outputs

HELP = """Summarise adapter files: format, base model, modules, ranks, alphas, sizes, metadata.

\b
Reads each file's header and only the small tensors it needs (alpha scalars); tensor data is
read only for --modules/--plot (‖ΔW‖_F, computed on the LoRA factors) and, when the file
stores an sshs_model_hash, once to check it: by default for files up to 256 MiB (SHA-256 runs at
about 1 GB/s), always with --hash, never with --no-hash.

\b
Several files: each good one is reported; each bad one gets one line on stderr
(loratool: error: <file>: <what>). The exit code is 1 if any file failed, else 0.
With --json, stdout holds one JSON list with an object per good file, in the order given.

\b
JSON fields (schema 1): path, size_bytes, container, format, base_model, empty, kinds,
modules (count), components {name: count}, ranks [distinct], rank_histogram {rank: count},
alphas [distinct, null = none stored], scales, dtypes {dtype: tensors}, tensors, params (all
stored values but alpha scalars: factors, DoRA magnitudes, bias changes, embeddings),
module_params (params without embeddings), full_params (Σ d·k of the adapted weights),
reduction_ratio (full_params / module_params),
ratio_by_component, conv_modules, dora_modules, bias_modules, embeddings {token: shape},
unknown_keys, metadata (kohya ss_* decoded: network, training dates, top_tags; modelspec;
keys: how many; other_keys: names of the rest),
hash_ok (true/false; null when no hash is stored or it was not checked), hash_checked,
metadata_base_model (what ss_base_model_version says, as sd1/sd2/sdxl/flux/sd3, or null),
base_model_detection (family, by: keys / metadata / keys+metadata / nothing, candidates the keys fit,
metadata_family, metadata_key).
--modules adds module_details (key, kind, shape, rank, alpha, scale, dtype, params, dora,
bias, delta_norm) and blocks {block: ‖ΔW‖_F}.
"""


@click.command(help=HELP, short_help="Summarise adapter files (format, ranks, sizes, metadata)")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--modules", "show_modules", is_flag=True, help="List every module with shape, rank, alpha, ‖ΔW‖_F.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw ‖ΔW‖_F per block and the rank histogram to this PNG (needs matplotlib).")
@click.option("--hash/--no-hash", "check_hash", default=None,
              help="Check the stored sshs_model_hash always / never (default: when the file is at most 256 MiB).")
@click.option("--top-tags", default=10, show_default=True, type=click.IntRange(0),
              help="How many training tags to show.")
@force_option
@json_option
@debug_option
@click.pass_context
def command(ctx, files, show_modules, plot_path, check_hash, top_tags, force, as_json) -> None:
    from loratool.ops.inspect import inspect_file

    outputs = Outputs(files, force=force) if plot_path else None
    if outputs is not None:
        outputs.claim(plot_path, "plot")
        rd.pyplot()  # fail early, before any work, when matplotlib is missing
    reports, failed = [], 0
    con = rd.console()
    for path in files:
        try:
            rep = inspect_file(path, modules=show_modules or bool(plot_path), check_hash=check_hash,
                               top_tags=top_tags)
        except LoraToolError as e:
            if debugging(ctx):
                raise
            click.echo(f"loratool: error: {e.one_line()}", err=True)
            failed += 1
            continue
        reports.append(rep)
        if not as_json:
            render_report(con, rep, show_modules)
    if plot_path and reports:
        plot_reports(reports, plot_path, outputs)
    if as_json:
        if not show_modules:  # computed only for the plot
            for rep in reports:
                rep.pop("module_details", None)
                rep.pop("blocks", None)
        emit_json(reports)
    if failed:
        ctx.exit(1)


# -- rendering ---------------------------------------------------------------------------------


def _ranks_line(rep: dict) -> str:
    hist = rep["rank_histogram"]
    if not hist:
        return "—"
    if len(hist) == 1:
        return next(iter(hist))
    return ", ".join(f"{r} ×{n}" for r, n in hist.items())


EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # SHA-256 of no bytes


def _hash_line(rep: dict) -> str:
    stored = (rep["metadata"].get("hashes", {}).get("sshs_model_hash") or "").strip().lower().removeprefix("0x")
    if not rep["hash_checked"]:
        return "stored, not checked (--hash checks it)" if stored else "none stored"
    if rep["hash_ok"]:
        return "sshs_model_hash matches the data"
    why = ("it is the SHA-256 of no data at all: the tool that wrote the file hashed it before the tensors "
           "were there (ai-toolkit does)") if stored == EMPTY_SHA256 else \
        "the tensors changed after it was stored (a tool rewrote them and kept the old metadata; rarely, damage)"
    layout = rep["format"] if isinstance(rep["format"], str) else "kohya"
    return (f"[yellow]sshs_model_hash does not match the data[/]: {why}. The file is still usable: every tensor is "
            "present and well formed, and loaders do not check this hash; only look-ups by it (A1111's and "
            f"Civitai's) will not find the file. `loratool convert {rep['path']} --to {layout} -o fixed`"
            " writes it with the right hash")


def _decided_by(rep: dict) -> str:
    found = rep.get("base_model_detection") or {}
    if not found:
        return ""
    fits = found["candidates"]
    if found["by"] == "nothing":  # no evidence: say which, not "by nothing"
        return (f" (the keys fit {', '.join(fits)}, and no metadata says which)" if len(fits) > 1 else
                " (neither the keys nor the metadata name a model family)")
    ambiguous = f"; keys fit {', '.join(fits)}" if len(fits) > 1 else ""
    return f" (by {found['by']}{ambiguous})"


def summary_rows(rep: dict) -> list[tuple[str, str]]:
    comps = ", ".join(f"{c} {n}" for c, n in rep["components"].items()) or "—"
    rows = [
        ("size", f"{rd.fmt_bytes(rep['size_bytes'])} ({rd.fmt_int(rep['size_bytes'])} bytes)"),
        ("format", f"{rep['format'] or '—'}   base model: {rep['base_model']}{_decided_by(rep)}"),
        ("kinds", ", ".join(rep["kinds"]) or "—"),
        ("modules", f"{rep['modules']} ({comps})"),
        ("rank", _ranks_line(rep)),
        ("alpha", rd.fmt_list(rep["alphas"]) + ("   (none stored: loaders apply scale 1, as alpha = rank)"
                                                 if None in rep["alphas"] else "")),
        ("scale", rd.fmt_list(rep["scales"]) + "   (what each ΔW is multiplied by: alpha / rank)"),
        ("dtypes", ", ".join(f"{d} ×{n}" for d, n in rep["dtypes"].items()) or "—"),
        ("parameters", f"{rd.fmt_int(rep['params'])}   (adapted weights: {rd.fmt_int(rep['full_params'])}, "
                       f"reduction ratio {rd.fmt_ratio(rep['reduction_ratio'])})"),
        ("extras", f"conv {rep['conv_modules']}, DoRA {rep['dora_modules']}, bias {rep['bias_modules']}"),
    ]
    if len(rep["ratio_by_component"]) > 1:
        rows.append(("ratio by part", ", ".join(f"{c} {rd.fmt_ratio(v['ratio'])}"
                                                for c, v in rep["ratio_by_component"].items())))
    if rep["embeddings"]:
        rows.append(("embeddings", ", ".join(f"{t} {s}" for t, s in rep["embeddings"].items())))
    unknown = rep["unknown_keys"]
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", … and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        rows.append(("unknown keys", f"[yellow]{len(unknown)}[/]: {shown}"))
    rows.append(("hash", _hash_line(rep)))
    return rows


def _short(value: str, limit: int = 100) -> str:
    """A metadata value on one line: long ones (a per-module report, a thumbnail) are cut; --json has them."""
    value = str(value)
    return value if len(value) <= limit else f"{value[:limit - 1]}… ({len(value):,} characters; --json shows all)"


def metadata_rows(meta: dict, rep: dict | None = None) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if meta.get("base_model_version"):
        text = str(meta["base_model_version"])
        said, found = (rep or {}).get("metadata_base_model"), (rep or {}).get("base_model")
        if said and found and found != "unknown" and said != found:
            text += f"  [yellow](the keys say {found})[/]"
        rows.append(("ss base model", text))
    net = meta.get("network") or {}
    if net:
        rows.append(("network", ", ".join(f"{k} {v}" for k, v in net.items())))
    train = meta.get("training") or {}
    if train:
        rows.append(("training", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in train.items())))
    if meta.get("top_tags"):
        rows.append(("top tags", ", ".join(f"{t} ({n})" for t, n in meta["top_tags"])))
    for k, v in (meta.get("modelspec") or {}).items():
        rows.append((f"modelspec.{k}", _short(v)))
    for k, v in (meta.get("loratool") or {}).items():
        rows.append((f"loratool.{k}", _short(v)))
    other = meta.get("other_keys") or []
    if other:
        shown = ", ".join(other[:10]) + (f", … and {len(other) - 10} more" if len(other) > 10 else "")
        rows.append(("other keys", f"{len(other)}: {shown}"))
    return rows


def render_report(con, rep: dict, show_modules: bool = False) -> None:
    con.print(f"[bold]{rep['path']}[/]")
    if rep["empty"]:
        con.print("  [yellow]empty: this file holds no tensors[/]"
                  + (f" ({rep['metadata']['keys']} metadata keys)" if rep["metadata"]["keys"] else ""))
        return
    con.print(rd.key_value_table(summary_rows(rep)))
    meta_rows = metadata_rows(rep["metadata"], rep)
    if meta_rows:
        con.print(rd.key_value_table(meta_rows, title=f"metadata ({rep['metadata']['keys']} keys)"))
    if len(rep["rank_histogram"]) > 1:
        t = rd.make_table("rank histogram", ["rank", "modules", ""], ("rank", "modules"))
        most = max(rep["rank_histogram"].values())
        for r, n in rep["rank_histogram"].items():
            t.add_row(r, str(n), "█" * max(1, round(30 * n / most)))
        con.print(t)
    if show_modules and "module_details" in rep:
        con.print(modules_table(rep["module_details"]))
    con.print()


def modules_table(rows: list[dict]):
    cols = ["module", "kind", "shape", "rank", "alpha", "scale", "dtype", "params", "‖ΔW‖_F"]
    t = rd.make_table(None, cols, ("rank", "alpha", "scale", "params", "‖ΔW‖_F"))
    for r in rows:
        kind = r["kind"] + (" +DoRA" if r["dora"] else "") + (" +bias" if r["bias"] else "")
        t.add_row(r["key"], kind, "×".join(map(str, r["shape"])), rd.fmt_int(r["rank"]),
                  rd.fmt_float(r["alpha"]), rd.fmt_float(r["scale"]), r["dtype"] or "—", rd.fmt_int(r["params"]),
                  rd.fmt_float(r.get("delta_norm")))
    return t


def plot_reports(reports: list[dict], path: str, outputs: Outputs) -> None:
    plt = rd.pyplot()
    fig, axes = plt.subplots(len(reports), 2, figsize=(13, 3.6 * len(reports)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for (ax_blocks, ax_ranks), rep in zip(axes, reports, strict=True):
        blocks = rep.get("blocks") or {}
        ax_blocks.bar(range(len(blocks)), list(blocks.values()))
        ax_blocks.set_xticks(range(len(blocks)), list(blocks), rotation=90, fontsize=6)
        ax_blocks.set(ylabel="‖ΔW‖_F", title=f"{rep['path']}: ‖ΔW‖_F per block")
        hist = rep["rank_histogram"]
        ax_ranks.bar(list(hist), list(hist.values()))
        ax_ranks.set(xlabel="rank", ylabel="modules", title="rank histogram")
    fig.tight_layout()
    rd.save_figure(outputs, fig, path)
