"""DreamBooth a subject the base never saw (a magenta cross, "sks") with LoRA and TriLoRA at equal rank.

    python bench/trainworld/dreambooth.py --model fixtures/tiny-sd --instance fixtures/tiny-instance -o OUT

Both adapters train with the same settings, data, seed and prior-preservation class images; at each
evaluation step the same seeds are sampled and judged by code (world.detect):

* fidelity  — share of "a sks shape" samples that are a magenta cross (template IoU >= 0.6);
* drift     — RMS pixel distance of "a shape" samples from the base model's (same seeds), the share of
              them that show magenta or a cross (leak), and base-world prompt following (colour+shape);
* collapse  — diversity (mean pairwise RMS distance across seeds) and saturated-pixel share.

The UNet layers default to ``all`` (LoCon): with attention-only adapters this tiny UNet learns the
subject's colour but hardly its shape (docs/TRAINING.md). ``sweep.py`` runs several settings at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # noqa: E402
import world  # noqa: E402

N_EVAL = 64


def world_prompts(n: int) -> list[world.Scene]:
    return world.random_scenes(n, torch.Generator().manual_seed(4321))


def measure(pipe, base_class: torch.Tensor | None) -> tuple[dict, dict]:
    seeds = list(range(N_EVAL))
    subj = ev.sample(pipe, [ev.SUBJECT_PROMPT] * N_EVAL, seeds)
    cls = ev.sample(pipe, [ev.CLASS_PROMPT] * N_EVAL, seeds)
    scenes = world_prompts(N_EVAL)
    wimgs = ev.sample(pipe, [s.caption() for s in scenes], seeds)
    wdet = [world.detect(im) for im in wimgs]
    s, c = ev.subject_metrics(subj), ev.subject_metrics(cls)
    row = {
        "fidelity": s["subject"], "subj_magenta": s["magenta"], "subj_cross": s["cross"],
        "subj_diversity": s["diversity"], "subj_saturated": s["saturated"],
        "class_leak": max(c["magenta"], c["cross"]), "class_diversity": c["diversity"],
        "class_saturated": c["saturated"],
        "class_drift": ev.drift(base_class, cls) if base_class is not None else 0.0,
        "prompt_following": sum(d.colour == sc.colour and d.shape == sc.shape
                                for d, sc in zip(wdet, scenes, strict=True)) / N_EVAL,
    }
    return row, {"subject": subj[:16], "class": cls[:16]}


def train_one(adapter: str, args, class_dir: Path, base_class: torch.Tensor, log, done: list[dict]) -> list[dict]:
    from loratool.train.config import TrainConfig
    from loratool.train.layers import OLD_UNET_LAYERS
    from loratool.train.loop import Trainer

    cfg = TrainConfig(model=args.model, instance_data=args.instance, instance_prompt=ev.SUBJECT_PROMPT,
                      output=str(args.out / adapter), class_data=str(class_dir), class_prompt=ev.CLASS_PROMPT,
                      num_class_images=args.class_images, adapter=adapter, rank=args.rank, steps=1,
                      lr=args.lr, batch_size=args.batch, resolution=32, targets=tuple(args.targets.split(",")),
                      unet_layers=OLD_UNET_LAYERS[args.unet_layers], caption_extension=args.caption_extension, snr_gamma=5.0,
                      trilora_init=args.trilora_init, seed=args.seed)
    tr = Trainer(cfg, torch.device(args.device))
    rows, train_s = [], 0.0
    for target in args.eval_at:
        tr.cfg.steps = target
        summary = tr.run()
        train_s += summary["seconds"]
        pipe = tr.base.pipeline()
        row, imgs = measure(pipe, base_class)
        row.update(adapter=adapter, step=target, loss_last50=sum(tr.losses[-50:]) / len(tr.losses[-50:]),
                   train_seconds=round(train_s, 1), it_per_s=round(target / train_s, 2),
                   trainable=summary["trainable_parameters"], peak_mb=summary["peak_gpu_memory_mb"])
        rows.append(row)
        log(json.dumps(row))
        save(args, [*done, *rows])
    ev.grid(torch.cat([imgs["subject"], imgs["class"]]), 16, args.out / f"{adapter}_final.png")
    from loratool.train.export import write_outputs

    write_outputs(tr, summary, time.time())
    return rows


COLUMNS = [("adapter", "{}"), ("step", "{}"), ("fidelity", "{:.2f}"), ("subj_magenta", "{:.2f}"),
           ("subj_cross", "{:.2f}"), ("class_drift", "{:.3f}"), ("class_leak", "{:.2f}"),
           ("prompt_following", "{:.2f}"), ("subj_diversity", "{:.3f}"), ("class_diversity", "{:.3f}"),
           ("subj_saturated", "{:.4f}"), ("loss_last50", "{:.3f}"), ("it_per_s", "{}")]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(f.format(r[c]) for c, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fixtures/tiny-sd")
    ap.add_argument("--instance", default="fixtures/tiny-instance")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--targets", default="unet,text_encoder")
    ap.add_argument("--unet-layers", default="all", choices=["attn", "transformer", "all"])
    ap.add_argument("--caption-extension", help="train on sidecar captions (e.g. .txt) where images have them")
    ap.add_argument("--class-dir", type=Path, help="class images (default OUT/class; made by the base when missing)")
    ap.add_argument("--class-images", type=int, default=64)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--adapters", nargs="+", default=["lora", "trilora"])
    ap.add_argument("--trilora-init", default="svd", choices=["svd", "orthogonal"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    base = ev.load_pipeline(args.model, args.device)
    base_row, base_imgs = measure(base, None)
    base_row.update(adapter="base", step=0, loss_last50=float("nan"), it_per_s="")
    base_class = ev.sample(base, [ev.CLASS_PROMPT] * N_EVAL, list(range(N_EVAL)))
    ev.grid(torch.cat([base_imgs["subject"], base_imgs["class"]]), 16, args.out / "base.png")
    log(json.dumps(base_row))
    rows = [base_row]
    save(args, rows)
    for adapter in args.adapters:
        rows += train_one(adapter, args, args.class_dir or args.out / "class", base_class, log, rows)
    log(table(rows))


def save(args, rows: list[dict]) -> None:
    """results.json and table.md as they stand (rewritten after every evaluation, so a cut run keeps its rows)."""
    (args.out / "results.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=1))
    (args.out / "table.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
