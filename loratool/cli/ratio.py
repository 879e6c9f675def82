"""``loratool ratio``: parameter counts and reduction ratios of LoRA, for a shape, a model or a file."""

from __future__ import annotations

import click

from loratool.arch import model_names
from loratool.cli import render as rd
from loratool.cli.options import debug_option, emit_json, force_option, json_option, targets_option
from loratool.errors import LoraToolError
from loratool.io.output import Outputs
from loratool.ops import ratio as R

DEFAULT_RANKS = (4, 8, 16, 32, 64, 128)
MODELS = ("sd15", *model_names())  # families and their size variants (wan-14b, sd3.5-large, ...)
GIB = 1 << 30

HELP = """Reduction ratio of LoRA against full fine-tuning: d·k / (r·(d+k)).

\b
A d×k weight has d·k parameters; a rank-r LoRA on it has r·(d+k) (up [d,r], down [r,k]).
A kh×kw conv counts as d = out, k = in·kh·kw. A square layer at r = d/10 gives 5×, not 10×.

\b
Exactly one of:
  --shape 1280x1280 -r 8 16 32        one layer (conv: OUTxINxKHxKW), per rank
  FILE [-r ...]                       an adapter as it is, per component and in total
                                      (with -r: its layers at each of those ranks too)
  --model sdxl --targets transformer -r ...
                                      a model's targeted layers, per rank: LoRA parameters,
                                      file size, ratio and a training-memory estimate

\b
The memory estimate counts weights + gradients + Adam's two moments, nothing else: no
activations, no CUDA/framework overhead, no EMA, no fp32 master copy, no 8-bit optimizers.
Weights are every tensor of the architecture table (denoiser, text encoders and VAE, biases,
norms and embeddings included). --components picks what is adapted: by default kohya's choice,
every component but T5-XXL (Flux, SD3). A full fine-tune trains all weights of those components,
the rest (VAE, other encoders) frozen; LoRA trains only its own parameters, the whole model
frozen. Bytes per parameter:
  fp32        weight 4, gradient 4, Adam 4+4
  fp16-mixed  weight 2, gradient 2, Adam 4+4 (moments in fp32)
File sizes are tensor data: the factors plus one alpha per module (the header is not counted).

-r takes one or more ranks: -r 8 16 32, -r 8,16,32 or -r 8 -r 16.
"""


def _ranks(given: tuple[str, ...], extra: list[str]) -> list[int]:
    out: list[int] = []
    for token in [*given, *extra]:
        for part in token.split(","):
            if not part.strip():
                continue
            try:
                r = int(part)
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a rank", param_hint="-r/--rank") from None
            if r <= 0:
                raise click.BadParameter(f"ranks must be positive, got {r}", param_hint="-r/--rank")
            out.append(r)
    return out


def _split_args(args: tuple[str, ...], ranks_given: bool) -> tuple[list[str], list[str]]:
    """Positional arguments: integers after ``-r`` are more ranks; anything else is a file."""
    files, extra = [], []
    for a in args:
        (extra if ranks_given and a.replace(",", "").isdigit() else files).append(a)
    return files, extra


@click.command(help=HELP, short_help="Reduction ratios, LoRA sizes and training-memory estimates")
@click.argument("args", nargs=-1, metavar="[FILE]")
@click.option("--shape", "shapes", multiple=True, metavar="DxK", help="A layer's weight shape (repeatable).")
@click.option("--model", type=click.Choice(MODELS), help="An architecture's targeted layers.")
@targets_option("transformer", "Which layers of --model a LoRA covers: ")
@click.option("--components", default="default", show_default=True, metavar="default|all|A,B",
              help="Which components of --model a LoRA covers (and a full fine-tune trains).")
@click.option("-r", "--rank", "rank_opts", multiple=True, metavar="R...", help="Ranks (default 4 8 16 32 64 128).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw a chart to this PNG.")
@force_option
@json_option
@debug_option
def command(args, shapes, model, targets, components, rank_opts, plot_path, force, as_json) -> None:
    files, extra = _split_args(args, bool(rank_opts))
    ranks = _ranks(rank_opts, extra)
    modes = sum([bool(shapes), bool(model), bool(files)])
    if modes != 1 or len(files) > 1:
        raise click.UsageError("give exactly one of --shape, --model or one FILE")
    outputs = Outputs(files, force=force)
    if plot_path:
        outputs.claim(plot_path, "plot")
    if shapes:
        result = _shape_mode(shapes, ranks or list(DEFAULT_RANKS))
    elif model:
        result = _model_mode(model, targets, components, ranks or list(DEFAULT_RANKS))
    else:
        result = _file_mode(files[0], ranks)
    if plot_path:
        _plot(result, plot_path, outputs)
    if as_json:
        emit_json(result)
    else:
        _render(result)


# -- the three modes: options here, arithmetic in loratool.ops.ratio ---------------------------


def _shape_mode(shapes: tuple[str, ...], ranks: list[int]) -> dict:
    parsed = []
    for text in shapes:
        try:
            parsed.append(R.parse_shape(text))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--shape") from None
    return R.shape_report(parsed, ranks)


def _model_mode(model: str, targets: str, components: str, ranks: list[int]) -> dict:
    from loratool.arch import load_arch

    arch = load_arch(model)
    try:
        chosen = R.pick_components(arch, components)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--components") from None
    return R.model_report(arch, targets, chosen, ranks)


def _file_mode(path: str, ranks: list[int]) -> dict:
    from loratool.formats.shapes import read_summary

    adapter = read_summary(path)  # the header alone where it tells everything: no torch
    if not adapter.modules:
        raise LoraToolError("no adapter modules in this file (nothing to compare)", path)
    return R.file_report(adapter, path, ranks)


# -- rendering ---------------------------------------------------------------------------------

NUM = ("d", "k", "rank", "layers", "modules", "full d·k", "LoRA r(d+k)", "adapter params", "ratio",
       "fp16 MiB", "fp32 MiB", "full fp32", "LoRA fp32", "full fp16-mixed", "LoRA fp16-mixed")


def _render(result: dict) -> None:
    con = rd.console()
    if result["mode"] == "shape":
        t = rd.make_table(None, ["shape", "d", "k", "rank", "full d·k", "LoRA r(d+k)", "ratio"], NUM)
        for r in result["rows"]:
            t.add_row("×".join(map(str, r["shape"])), rd.fmt_int(r["d"]), rd.fmt_int(r["k"]), str(r["rank"]),
                      rd.fmt_int(r["full_params"]), rd.fmt_int(r["lora_params"]), rd.fmt_ratio(r["ratio"]))
        con.print(t)
    elif result["mode"] == "model":
        _render_model(con, result)
    else:
        _render_file(con, result)


def _render_model(con, result: dict) -> None:
    mp = result["model_params"]
    con.print(f"[bold]{result['model']}[/], targets {result['targets']}: {result['layers']} layers "
              f"({', '.join(f'{c} {n}' for c, n in result['layers_by_component'].items())}), "
              f"Σ d·k = {rd.fmt_int(result['full_params'])}; model weights "
              f"{rd.fmt_int(mp['trainable'] + mp['frozen'])} ({rd.fmt_int(mp['frozen'])} frozen in a full "
              "fine-tune)")
    cols = ["rank", "LoRA r(d+k)", "fp16 MiB", "fp32 MiB", "ratio", "full fp32", "LoRA fp32",
            "full fp16-mixed", "LoRA fp16-mixed"]
    t = rd.make_table("training memory: weights + gradients + Adam states only (see --help)", cols, NUM)
    for r in result["rows"]:
        m = r["memory_bytes"]
        t.add_row(str(r["rank"]), rd.fmt_int(r["lora_params"]), rd.fmt_mib(r["fp16_mib"]), rd.fmt_mib(r["fp32_mib"]),
                  rd.fmt_ratio(r["ratio"]), rd.fmt_bytes(m["fp32"]["full"]["total"]),
                  rd.fmt_bytes(m["fp32"]["lora"]["total"]), rd.fmt_bytes(m["fp16-mixed"]["full"]["total"]),
                  rd.fmt_bytes(m["fp16-mixed"]["lora"]["total"]))
    con.print(t)


def _render_file(con, result: dict) -> None:
    con.print(f"[bold]{result['path']}[/]  ({result['format']}, base {result['base_model']})")
    t = rd.make_table(None, ["component", "modules", "full d·k", "adapter params", "ratio"], NUM)
    for comp, c in result["components"].items():
        t.add_row(comp, rd.fmt_int(c["modules"]), rd.fmt_int(c["full_params"]), rd.fmt_int(c["adapter_params"]),
                  rd.fmt_ratio(c["ratio"]))
    tot = result["total"]
    t.add_row("[bold]total[/]", rd.fmt_int(tot["modules"]), rd.fmt_int(tot["full_params"]),
              rd.fmt_int(tot["adapter_params"]), rd.fmt_ratio(tot["ratio"]))
    con.print(t)
    if result.get("rows"):
        t = rd.make_table("the same layers at other ranks", ["rank", "layers", "full d·k", "LoRA r(d+k)", "ratio"],
                          NUM)
        for r in result["rows"]:
            t.add_row(str(r["rank"]), rd.fmt_int(r["layers"]), rd.fmt_int(r["full_params"]),
                      rd.fmt_int(r["lora_params"]), rd.fmt_ratio(r["ratio"]))
        con.print(t)


def _plot(result: dict, path: str, outputs: Outputs) -> None:
    plt = rd.pyplot()
    rows = result.get("rows") or []
    if not rows:
        raise LoraToolError("nothing to plot: give ranks with -r", path)
    if result["mode"] == "model":
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        ranks = [r["rank"] for r in rows]
        a1.plot(ranks, [r["ratio"] for r in rows], "o-")
        a1.set(xscale="log", yscale="log", xlabel="rank", ylabel="reduction ratio d·k / r(d+k)",
               title=f"{result['model']} {result['targets']}")
        for prec, color in (("fp32", "C0"), ("fp16-mixed", "C1")):
            a2.plot(ranks, [r["memory_bytes"][prec]["lora"]["total"] / GIB for r in rows], "o-", color=color,
                    label=f"LoRA {prec}")
            a2.axhline(rows[0]["memory_bytes"][prec]["full"]["total"] / GIB, ls="--", color=color,
                       label=f"full fine-tune {prec}")
        a2.set(xscale="log", xlabel="rank", ylabel="GiB (weights+grads+Adam)", title="training memory")
        a2.legend(fontsize=8)
    else:
        fig, a1 = plt.subplots(figsize=(6, 4))
        for label in sorted({"×".join(map(str, r.get("shape", []))) for r in rows}):
            sel = [r for r in rows if "×".join(map(str, r.get("shape", []))) == label]
            a1.plot([r["rank"] for r in sel], [r["ratio"] for r in sel], "o-", label=label or "file layers")
        a1.set(xscale="log", yscale="log", xlabel="rank", ylabel="reduction ratio")
        a1.legend(fontsize=8)
    rd.save_figure(outputs, fig, path)
