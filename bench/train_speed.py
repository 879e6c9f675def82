"""Benchmark: loratool's trainer beside diffusers' DreamBooth-LoRA scripts at full SD1.5 and SDXL size.

    python bench/train_speed.py --tokenizers DIR [--work DIR] [--out DIR] [--budget SECONDS] [--smoke]
                                [--only NAME ...] [--no-claims] [--profile]

On one CUDA device: builds SD1.5 and SDXL diffusers folders with random weights from the published configs
(bench/train/fixtures.py; the tokenizers come from DIR, made by ``python bench/train/fixtures.py tokenizers
DIR``), writes image folders (8 instance and 16 class images at the model's resolution), then runs each
configuration below once with loratool (bench/train/ours.py) and, where the peer can train it, once with
diffusers' script (bench/train/peer.py), each in a fresh process, one after the other. Every run does
``WARMUP`` steps and then ``TIMED`` timed ones (median s/step). Prior preservation is always on, so a step
puts ``2 × batch`` images through the UNet (images/s counts those). The configurations run in the order
listed; one that would not finish inside ``--budget`` is skipped and reported so, and a run that fails is
reported with its error while the others go on. At "claims" in that order, bench/train/claims.py measures the
memory split of full fine-tuning and LoRA (the seed's claims, docs/TRAINING.md).

Results: a table per part on stdout and in OUT/train_speed.md, the raw numbers in OUT/train_speed.json and
OUT/claims.json, each worker's log under WORK/logs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "bench" / "train"
WARMUP, TIMED = 5, 50
GIB = 2**30


def cfg(name: str, arch: str, batch: int, rank: int, te: bool, precision: str, gc: bool, adapter: str = "lora",
        layers: str = "attn", peer: bool = True, **extra) -> dict:
    return dict(name=name, arch=arch, resolution=512 if arch == "sd15" else 1024, batch=batch, rank=rank,
                text_encoder=te, precision=precision, checkpointing=gc, adapter=adapter, layers=layers, peer=peer,
                **extra)


# In priority order. Every axis of issue 18 is varied at least once: model (SD1.5 512², SDXL 1024²), batch
# (1, 4), rank (8, 32), UNet / UNet + text encoder, fp16 / bf16, gradient checkpointing off / on; TriLoRA and
# LoCon (--unet-layers transformer+conv) beside LoRA at equal settings (ours only: the peer trains attention LoRA
# only); --recompute-pointwise, --no-cache, --channels-last and --compile at the first setting (ours only), and
# --compile where the host is the bottleneck (SDXL batch 1 with checkpointing).
CONFIGS = [
    cfg("sd15-b4-r8-unet-fp16", "sd15", 4, 8, False, "fp16", False),
    cfg("sdxl-b1-r8-unet-fp16-gc", "sdxl", 1, 8, False, "fp16", True),
    cfg("sd15-b1-r8-unet-fp16", "sd15", 1, 8, False, "fp16", False),
    "claims",  # bench/train/claims.py: the memory split of full fine-tuning and LoRA
    cfg("sd15-b4-r32-te-bf16-gc", "sd15", 4, 32, True, "bf16", True),
    cfg("sd15-b4-r8-unet-fp16-trilora", "sd15", 4, 8, False, "fp16", False, adapter="trilora", peer=False),
    cfg("sd15-b4-r8-unet-fp16-locon", "sd15", 4, 8, False, "fp16", False, layers="transformer+conv", peer=False),
    cfg("sd15-b4-r8-unet-fp16-nocache", "sd15", 4, 8, False, "fp16", False, peer=False, cache=False),
    cfg("sd15-b4-r8-unet-fp16-channels-last", "sd15", 4, 8, False, "fp16", False, peer=False, channels_last=True),
    cfg("sd15-b4-r8-unet-fp16-recompute", "sd15", 4, 8, False, "fp16", False, peer=False, recompute=True),
    cfg("sdxl-b1-r32-te-bf16", "sdxl", 1, 32, True, "bf16", False),
    cfg("sdxl-b1-r32-te-bf16-recompute", "sdxl", 1, 32, True, "bf16", False, peer=False, recompute=True),
    cfg("sd15-b4-r8-unet-fp16-compile", "sd15", 4, 8, False, "fp16", False, peer=False, compile=True),
    cfg("sdxl-b1-r8-unet-fp16-gc-compile", "sdxl", 1, 8, False, "fp16", True, peer=False, compile=True),
]
SMOKE = ["sd15-b4-r32-te-bf16-gc", "claims"]
COST = {"sd15": 35, "sdxl": 70}  # seconds one run takes, about (load, warm-up, timed steps, saving)
BUILD_COST = {"sd15": 25, "sdxl": 60}
COMPILE_COST = {"sd15": 90, "sdxl": 400}  # --compile's first steps: SD1.5 a guess; SDXL with checkpointing took over 300 s (H100)


class Bench:
    def __init__(self, args) -> None:
        self.args, self.start = args, time.time()
        self.work, self.out = args.work, args.out
        for d in (self.work / "logs", self.out):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1"}
        self.rows: list[dict] = []
        self.claims_result: dict | None = None

    def left(self) -> float:
        return self.args.budget - (time.time() - self.start)

    def model(self, arch: str) -> Path:
        folder = self.work / "models" / arch
        if not (folder / "model_index.json").is_file():
            t0 = time.time()
            subprocess.run([sys.executable, str(HERE / "fixtures.py"), arch, str(folder), "--tokenizers",
                            str(self.args.tokenizers)], check=True, env=self.env)
            print(f"built {arch} in {time.time() - t0:.0f} s", flush=True)
        return folder

    def data(self, resolution: int) -> tuple[Path, Path]:
        sys.path.insert(0, str(HERE))
        from fixtures import make_images

        root = self.work / "data" / str(resolution)
        return make_images(root / "instance", 8, resolution, 0), make_images(root / "class", 16, resolution, 1)

    def worker(self, script: str, spec: dict, timeout: float) -> dict:
        tag = f"{spec['name']}-{script.removesuffix('.py')}"
        spec_path, result_path = self.work / f"{tag}.spec.json", self.work / f"{tag}.result.json"
        spec_path.write_text(json.dumps(spec))
        result_path.unlink(missing_ok=True)
        log = self.work / "logs" / f"{tag}.log"
        t0 = time.time()
        with open(log, "w") as fh:
            try:
                proc = subprocess.run([sys.executable, str(HERE / script), str(spec_path), str(result_path)],
                                      stdout=fh, stderr=subprocess.STDOUT, env=self.env, timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if result_path.is_file():
            return {**json.loads(result_path.read_text()), "wall_s": round(time.time() - t0, 1)}
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"exit {code}: " + " | ".join(tail)[-400:]}

    def run(self, c: dict) -> None:
        runs = ["ours.py"] + (["peer.py"] if c["peer"] else [])
        need = COST[c["arch"]] * len(runs) + COMPILE_COST[c["arch"]] * bool(c.get("compile"))
        need += 0 if (self.work / "models" / c["arch"]).is_dir() else BUILD_COST[c["arch"]]
        row = {"config": c}
        if need > self.left():
            row["skipped"] = f"not run: {need:.0f} s needed, {self.left():.0f} s of the budget left"
        else:
            model = self.model(c["arch"])
            inst, klass = self.data(c["resolution"])
            for script in runs:
                spec = {**c, "model": str(model), "instance": str(inst), "class_dir": str(klass), "n_class": 16,
                        "warmup": self.args.warmup, "timed": self.args.timed,
                        "out": str(self.work / "runs" / f"{c['name']}-{script[:-3]}")}
                prof = self.out / f"{c['name']}-{script[:-3]}.profile.json"
                if self.args.profile:
                    spec["profile"] = str(prof)
                got = self.worker(script, spec, max(60.0, self.left()))
                if self.args.profile and prof.is_file():
                    got["profile"] = json.loads(prof.read_text())
                row["ours" if script == "ours.py" else "diffusers"] = got
        self.rows.append(row)
        self.save()
        print(speed_table([row], header=len(self.rows) == 1), flush=True)
        if self.args.profile:
            print(profile_table(row), flush=True)

    def claims(self) -> dict:
        if self.left() < 100:
            self.claims_result = {"skipped": f"not run: {self.left():.0f} s of the budget left"}
        else:
            model = self.model("sd15")
            inst, _ = self.data(512)
            smoke = self.args.smoke
            spec = {"name": "claims", "model": str(model), "instance": str(inst),
                    "out": str(self.work / "runs" / "claims"), "lora_ranks": [8] if smoke else [8, 32, 128],
                    "trilora_ranks": [] if smoke else [32], "full": not smoke}
            self.claims_result = self.worker("claims.py", spec, max(60.0, self.left()))
        self.save()
        return self.claims_result

    def save(self) -> None:
        claims = self.claims_result
        (self.out / "train_speed.json").write_text(json.dumps(self.rows, indent=1))
        text = speed_table(self.rows)
        if claims is not None:
            (self.out / "claims.json").write_text(json.dumps(claims, indent=1))
            text += "\n\n" + claims_table(claims)
        (self.out / "train_speed.md").write_text(text + "\n")


def _gib(n) -> str:
    return "—" if n is None else f"{n / GIB:.2f}"


def _ratio(a, b, fmt="{:.2f}×") -> str:
    return fmt.format(a / b) if a and b else "—"


SPEED_HEAD = ("| config | trainer | s/step | images/s | peak allocated GiB | peak reserved GiB | predicted GiB "
              "(error) | first step s | LoRA MB |\n|---|---|---|---|---|---|---|---|---|")


def speed_table(rows: list[dict], header: bool = True) -> str:
    lines = [SPEED_HEAD] if header else []
    for row in rows:
        name = row["config"]["name"]
        if "skipped" in row:
            lines.append(f"| {name} | — | {row['skipped']} | | | | | | |")
            continue
        for who in ("ours", "diffusers"):
            r = row.get(who)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | {who} | failed: {r['error'][:150]} | | | | | | |")
                continue
            s = r["ms_per_step"] / 1000
            pred = r.get("predicted", {}).get("peak")
            err = f"{pred / GIB:.2f} ({(pred - r['peak_allocated']) / r['peak_allocated']:+.0%})" \
                if pred and r.get("peak_allocated") else "—"
            lines.append(f"| {name} | {who} | {s:.3f} | {r['images_per_step'] / s:.2f} | {_gib(r['peak_allocated'])} | "
                         f"{_gib(r['peak_reserved'])} | {err} | {r['time_to_first_step_s']:.1f} | "
                         f"{r['lora_bytes'] / 1e6:.1f} |")
        ours, peer = row.get("ours", {}), row.get("diffusers", {})
        if "ms_per_step" in ours and "ms_per_step" in peer:
            lines.append(f"| {name} | ours ÷ diffusers | {_ratio(ours['ms_per_step'], peer['ms_per_step'])} | "
                         f"{_ratio(peer['ms_per_step'], ours['ms_per_step'])} | "
                         f"{_ratio(ours['peak_allocated'], peer['peak_allocated'])} | "
                         f"{_ratio(ours['peak_reserved'], peer['peak_reserved'])} | | "
                         f"{_ratio(ours['time_to_first_step_s'], peer['time_to_first_step_s'])} | |")
    return "\n".join(lines)


def profile_table(row: dict) -> str:
    """Where a step's time goes, per trainer (bench/train/profile_steps.py), then each one's costliest kernels."""
    runs = {who: row[who]["profile"] for who in ("ours", "diffusers") if "profile" in row.get(who, {})}
    if not runs:
        return f"{row['config']['name']}: no profile"
    kinds = sorted({k for p in runs.values() for k in p["kernel_ms_per_step_by_kind"]})
    lines = [f"| {row['config']['name']} (profiled warm-up steps) | " + " | ".join(runs) + " |",
             "|---|" + "---|" * len(runs)]
    for label, key, fmt in (("host wall ms/step", "wall_ms_per_step", "{:.1f}"),
                            ("GPU kernel ms/step", "gpu_kernel_ms_per_step", "{:.1f}"),
                            ("GPU busy", "gpu_busy", "{:.0%}"), ("kernel launches/step", "kernel_launches_per_step",
                                                                "{:.0f}")):
        lines.append(f"| {label} | " + " | ".join(fmt.format(p[key]) if p.get(key) is not None else "—"
                                                  for p in runs.values()) + " |")
    for k in kinds:
        lines.append(f"| {k} ms/step | " + " | ".join(f"{p['kernel_ms_per_step_by_kind'].get(k, 0.0):.1f}"
                                                     for p in runs.values()) + " |")
    for who, p in runs.items():
        lines.append(f"\n{who}, costliest kernels (ms/step, calls/step):")
        lines += [f"  {k['ms_per_step']:8.2f} {k['calls_per_step']:6.0f}  {k['kind']:<18} {k['name']}"
                  for k in p["top_kernels"][:12]]
        lines.append(f"{who}, costliest host operators (self CPU ms/step, calls/step):")
        lines += [f"  {k['self_cpu_ms_per_step']:8.2f} {k['calls_per_step']:6.0f}  {k['name']}"
                  for k in p["top_host_ops"][:10]]
    return "\n".join(lines)


def claims_table(claims: dict) -> str:
    if "skipped" in claims or "error" in claims:
        return f"claims: {claims.get('skipped') or claims.get('error')}"
    lines = ["| SD1.5, 512², batch 1, UNet + text encoder | weights GiB | gradients GiB | optimizer GiB | "
             "activations GiB | peak GiB | reserved GiB | predicted GiB |", "|---|---|---|---|---|---|---|---|"]
    for name, r in claims.items():
        if name in ("wall_s",):
            continue
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:150]} | | | | | | |")
            continue
        pred = r.get("predicted", {}).get("peak")
        lines.append(f"| {name} | {_gib(r['weights'])} | {_gib(r['gradients'])} | {_gib(r['optimizer'])} | "
                     f"{_gib(r['activations'])} | {_gib(r['peak'])} | {_gib(r['reserved'])} | {_gib(pred)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/loratool-train-bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default 540)")
    ap.add_argument("--smoke", action="store_true", help=f"only {', '.join(SMOKE)} and a short claims run")
    ap.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    ap.add_argument("--no-claims", action="store_true")
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--timed", type=int, default=TIMED)
    ap.add_argument("--profile", action="store_true", help="profile warm-up steps 2..WARMUP of every run under "
                    "torch.profiler (needs --warmup 4 or more; the timed steps are not profiled): a table per "
                    "configuration and OUT/NAME-TRAINER.profile.json")
    args = ap.parse_args(argv)
    if args.profile and args.warmup < 4:
        ap.error("--profile needs --warmup 4 or more")
    names = [c if c == "claims" else c["name"] for c in CONFIGS]
    wanted = SMOKE if args.smoke else (args.only or names)
    bench = Bench(args)
    for c, name in zip(CONFIGS, names, strict=True):
        if name not in wanted or (name == "claims" and args.no_claims):
            continue
        if name == "claims":
            print("\n" + claims_table(bench.claims()) + "\n", flush=True)
        else:
            bench.run(c)
    bench.save()
    print(f"\nwall {time.time() - bench.start:.0f} s")


if __name__ == "__main__":
    main()
