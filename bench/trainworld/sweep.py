"""Run several DreamBooth settings of the small world side by side on one GPU, and table them together.

    python bench/trainworld/sweep.py -o OUT --run "lora_attn=--adapters lora" \
        --run "lora_all=--adapters lora --unet-layers all" [--common "--eval-at 500 1000 2000"]

Each ``--run NAME=ARGS`` is one ``dreambooth.py`` process (ARGS are its options; ``--common`` is added to
all). The models are tiny and each process is bound by Python, not by the GPU, so running them at once
uses the machine's cores; their it/s are therefore measured under that contention and compare runs of the
same sweep only. Each process gets one CPU thread (OMP_NUM_THREADS=1): a dozen processes each spinning
up a thread per core made every run ten times slower. ``--timeout`` stops runs that are still going; the
rows they had evaluated are kept. The class images are made once by the base model before the runs start, so every run
regularises with the same set.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dreambooth  # noqa: E402
import evaluate as ev  # noqa: E402
import world  # noqa: E402


def make_class_images(model: str, folder: Path, n: int, device: str, captioned: int = 0) -> None:
    """``n`` images of the class prompt and ``captioned`` more of random full world captions, each of those
    with its caption in a ``.txt`` sidecar (regularisation that covers the whole language of the world)."""
    from loratool.train.data import generate_class_images, save_image

    pipe = ev.load_pipeline(model, device)
    generate_class_images(pipe, folder, ev.CLASS_PROMPT, n, 32, seed=0)
    scenes = world.random_scenes(captioned, torch.Generator().manual_seed(777))
    captions = [s.caption() for s in scenes]
    imgs = ev.sample(pipe, captions, [10_000 + i for i in range(captioned)]) if captioned else []
    for i, (img, caption) in enumerate(zip(imgs, captions, strict=True)):
        save_image(img, folder / f"world-{i:05d}.png")
        (folder / f"world-{i:05d}.txt").write_text(caption + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--run", action="append", required=True, help="NAME=dreambooth.py options")
    ap.add_argument("--common", default="", help="options added to every run")
    ap.add_argument("--model", default="fixtures/tiny-sd")
    ap.add_argument("--class-images", type=int, default=64)
    ap.add_argument("--captioned-class-images", type=int, default=0,
                    help="add this many class images of full world captions, captions in .txt sidecars "
                         "(give the runs --caption-extension .txt)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--timeout", type=float, default=1e9, help="seconds after which unfinished runs are stopped")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args.out.mkdir(parents=True, exist_ok=True)
    class_dir = args.out / "class"
    make_class_images(args.model, class_dir, args.class_images, args.device, args.captioned_class_images)
    procs = {}
    for spec in args.run:
        name, _, opts = spec.partition("=")
        cmd = [sys.executable, str(HERE / "dreambooth.py"), "--model", args.model, "-o", str(args.out / name),
               "--class-dir", str(class_dir), "--class-images", str(args.class_images + args.captioned_class_images),
               "--device", args.device,
               *shlex.split(args.common), *shlex.split(opts)]
        log = (args.out / f"{name}.log").open("w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
        print(f"started {name}: {' '.join(cmd[2:])}", flush=True)
    rows, failed = [], []
    deadline = time.time() + args.timeout
    for name, (proc, log, start) in procs.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = f"stopped by --timeout ({proc.wait()})"
        log.close()
        print(f"{name}: exit {code} after {time.time() - start:.0f}s", flush=True)
        results = args.out / name / "results.json"
        if code:
            failed.append(name)
        if not results.exists():
            continue
        for row in json.loads(results.read_text())["rows"]:
            if row["adapter"] != "base" or not rows:
                rows.append({**row, "run": name})
    columns = [("run", "{}"), *dreambooth.COLUMNS]
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    body = ["| " + " | ".join(f.format(r[c]) for c, f in columns) + " |" for r in rows]
    table = "\n".join([head, "|" + "---|" * len(columns), *body])
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps({"runs": args.run, "common": args.common, "rows": rows},
                                                      indent=1))
    print(table)
    if failed:
        print(f"failed or cut: {', '.join(failed)} (see their logs)", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
