"""Benchmark: `loratool extract` beside kohya's algorithm and the I/O floor, on full-size checkpoints.

Builds a base/tuned single-file checkpoint pair with the real key layout and shapes
(../shared/fixtures/real/keyshapes/<arch>_*_checkpoint_full.json, EMA weights left out as in a
pruned fp16 release; random weights N(0, 0.02²), fp16). Tuned = base + a synthetic fine-tune delta on
every ≥2-D U-Net weight: a rank-q product with singular values ∝ i^-0.8 (‖·‖ ≈ 3 % of ‖W‖) plus dense
Gaussian noise (‖·‖ ≈ 0.5 % of ‖W‖); text encoders and VAE are unchanged. Then, each in its own
process on the same files (page cache warm for all three, the files were just written):

* loratool  — ops.extract (streamed, randomized SVD, fp16 output);
* kohya     — a re-implementation of sd-scripts' extract_lora_from_models algorithm
               (reference/kohya.md §2.2): both models loaded into memory as fp32, the global
               text-encoder check, full torch.linalg.svd per module, all of S into up, 0.99 quantile
               clamp, fp32 output;
* floor     — read the same target tensors of both files (pinned buffers, prefetch thread) and copy
               them to the device; no math.

Errors are ‖ΔW − up·down‖_F/‖ΔW‖_F per module divided by the Eckart–Young optimum (from kohya's
full-SVD singular values, before its clamp).

    python bench/extract.py --arch sd1 --rank 32 --device cpu
    python bench/extract.py --arch sdxl --rank 64 --targets attn+conv --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"sd1": "sd15_ldm_checkpoint_full.json", "sdxl": "sdxl_sgm_checkpoint_full.json"}
UNET_PREFIX = "model.diffusion_model."


def keyshapes(arch: str, folder: Path) -> list[tuple[str, tuple[int, ...], str]]:
    data = json.loads((folder / LAYOUTS[arch]).read_text())
    out = []
    for key, entry in data.items():
        if entry["component"] in ("ema", "scheduler"):
            continue
        out.append((key, tuple(entry["shape"]), entry["dtype"]))
    return out


def synthetic_delta(w: torch.Tensor, gen: torch.Generator, q_max: int = 256) -> torch.Tensor:
    """A fine-tune-like ΔW for ``w`` (any ≥2-D shape): decaying rank-q part plus dense noise."""
    m, n = w.shape[0], w[0].numel()
    q = min(m, n, q_max)
    dev = w.device
    a = torch.randn(m, q, generator=gen, device=dev) / math.sqrt(m)
    b = torch.randn(q, n, generator=gen, device=dev) / math.sqrt(n)
    s = torch.arange(1, q + 1, device=dev, dtype=torch.float32) ** -0.8
    low = (a * s) @ b
    wn = float(w.float().norm())
    low *= 0.03 * wn / float(low.norm())
    noise = torch.randn(m, n, generator=gen, device=dev)
    noise *= 0.005 * wn / float(noise.norm())
    return (low + noise).reshape(w.shape)


def write_pair(arch: str, folder: Path, layout_dir: Path, device: str, seed: int = 0) -> tuple[Path, Path]:
    """Stream both files to disk, one tensor at a time (memory: one tensor)."""
    layout = keyshapes(arch, layout_dir)
    dt = {"float32": (torch.float16, "F16", 2), "int64": (torch.int64, "I64", 8), "int32": (torch.int32, "I32", 4)}
    header, offset = {}, 0
    for key, shape, dtype in layout:
        nbytes = math.prod(shape) * dt[dtype][2]
        header[key] = {"dtype": dt[dtype][1], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    paths = folder / f"{arch}_base.safetensors", folder / f"{arch}_tuned.safetensors"
    gen = torch.Generator(device=device).manual_seed(seed)
    with open(paths[0], "wb") as fb, open(paths[1], "wb") as ft:
        for fh in (fb, ft):
            fh.write(len(raw).to_bytes(8, "little") + raw)
        for key, shape, dtype in layout:
            torch_dtype = dt[dtype][0]
            if torch_dtype != torch.float16:
                t = torch.zeros(shape, dtype=torch_dtype)
                fb.write(t.numpy().tobytes())
                ft.write(t.numpy().tobytes())
                continue
            w = torch.randn(shape, generator=gen, device=device) * 0.02
            base = w.half()
            tuned = (w + synthetic_delta(w, gen)).half() if key.startswith(UNET_PREFIX) and len(shape) >= 2 else base
            fb.write(base.cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            ft.write(tuned.cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return paths


# ------------------------------------------------------------------ the three contenders


def targets(arch: str, kind: str):
    from loratool.arch import load_arch

    return load_arch(arch).targets(kind)


def run_loratool(base: Path, tuned: Path, args) -> dict:
    from loratool.linalg import SvdPolicy
    from loratool.ops.extract import extract
    from loratool.ops.extract_plan import ExtractOptions

    opts = ExtractOptions(rank=args.rank, conv_rank=args.rank, targets=args.targets, device=args.device,
                          policy=SvdPolicy(niter=args.niter))
    res = extract(base, tuned, opts)
    out = Path(args.workdir) / "loratool_out.safetensors"
    from loratool.formats.write import write_adapter

    write_adapter(res.adapter, out, "kohya", force=True, inputs=[base, tuned])
    return {"errors": {r.key: r.rel_error for r in res.reports if r.status == "ok"},
            "modules": res.summary["modules"]}


def run_floor(base: Path, tuned: Path, args) -> dict:
    """loratool's own reader and device copies (ops.extract.stream_pairs), with no math."""
    from loratool.ops.extract import open_pair, stream_pairs
    from loratool.ops.extract_plan import ExtractOptions, build_plan

    nbytes = 0
    with open_pair(base, tuned) as (b, t):
        plan = build_plan(b, t, ExtractOptions(rank=args.rank, targets=args.targets))
        for _, base_w, tuned_w in stream_pairs(b, t, plan.modules, torch.device(args.device)):
            nbytes += sum(x.numel() * x.element_size() for x in (*base_w, *tuned_w))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"bytes": nbytes, "modules": len(plan.modules)}


def run_kohya(base: Path, tuned: Path, args) -> dict:
    """sd-scripts' algorithm (reference/kohya.md §2.2), minus its model classes."""
    from safetensors.torch import load_file, save_file

    org = {k: v.float() for k, v in load_file(str(base)).items()}  # kohya builds fp32 models
    tun = {k: v.float() for k, v in load_file(str(tuned)).items()}
    specs = targets(args.arch, args.targets)
    te = [s for s in specs if s.component.startswith("text_encoder")]
    te_diffs = {s.key: _ckpt(tun, s) - _ckpt(org, s) for s in te}
    te_same = all(float(d.abs().max()) <= 0.01 for d in te_diffs.values())  # --min_diff 0.01, global
    diffs = {} if te_same else te_diffs
    del te_diffs
    for s in specs:
        if not s.component.startswith("text_encoder"):
            diffs[s.key] = _ckpt(tun, s) - _ckpt(org, s)
    out, errors, optimal, err_time = {}, {}, {}, 0.0
    for key, mat in diffs.items():
        shape = mat.shape
        mat = mat.to(args.device).reshape(shape[0], -1)
        rank = min(args.rank, shape[0], shape[1])
        u, s, vh = torch.linalg.svd(mat)  # full_matrices=True, as kohya calls it
        up = u[:, :rank] @ torch.diag(s[:rank])
        down = vh[:rank, :]
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
        t0 = time.perf_counter()  # the error bookkeeping is not kohya's: its time is left out
        s64 = s.double()
        optimal[key] = float(s64[rank:].square().sum().sqrt() / s64.square().sum().sqrt())
        errors[key] = float((mat - up @ down).norm() / mat.norm())
        err_time += time.perf_counter() - t0
        if len(shape) == 4:
            up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
        name = key.replace(".", "_")
        out[f"{name}.lora_up.weight"] = up.cpu().contiguous()
        out[f"{name}.lora_down.weight"] = down.cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(out, str(Path(args.workdir) / "kohya_out.safetensors"))
    return {"errors": errors, "optimal": optimal, "excluded_s": err_time, "modules": len(errors)}


def _ckpt(sd: dict, spec) -> torch.Tensor:
    t = sd[spec.checkpoint_key]
    if spec.checkpoint_rows:
        t = t[spec.checkpoint_rows[0]:spec.checkpoint_rows[1]]
    return t.reshape(spec.shape)


RUNNERS = {"floor": run_floor, "loratool": run_loratool, "kohya": run_kohya}


def one(args) -> None:
    """Child process: run one contender, print one JSON line."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.device.startswith("cuda"):
        torch.zeros(1, device=args.device)  # context creation is left out for every contender
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = RUNNERS[args.one](Path(args.base), Path(args.tuned), args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0 - result.pop("excluded_s", 0.0)
    use = resource.getrusage(resource.RUSAGE_SELF)
    result.update(wall_s=wall, cpu_s=use.ru_utime + use.ru_stime, rss_gib=use.ru_maxrss / 2**20,
                  gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0)
    print("RESULT " + json.dumps(result))


def child(method: str, base: Path, tuned: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--one", method, "--base", str(base), "--tuned", str(tuned),
           "--arch", args.arch, "--rank", str(args.rank), "--targets", args.targets, "--device", args.device,
           "--workdir", str(args.workdir), "--niter", str(args.niter), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def ratios(errors: dict, optimal: dict) -> tuple[float, float]:
    r = [errors[k] / optimal[k] for k in errors if k in optimal and optimal[k] > 0]
    return (sum(r) / len(r), max(r)) if r else (float("nan"), float("nan"))


def table(results: dict, args, gen_s: float, sizes: tuple[int, int]) -> str:
    opt = results.get("kohya", {}).get("optimal", {})
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    load = os.getloadavg()[0]
    lines = [f"extract {args.arch} rank {args.rank} --targets {args.targets} on {dev} (load average {load:.1f} at "
             f"the end); torch {torch.__version__};"
             f" files {sizes[0] / 2**30:.2f} + {sizes[1] / 2**30:.2f} GiB fp16 (written in {gen_s:.0f} s)", "",
             "| method | modules | wall s | × vs kohya | × floor | CPU s (all threads) | peak RSS GiB | peak GPU GiB "
             "| err/opt mean | err/opt worst |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    k = results.get("kohya", {}).get("wall_s")
    f = results.get("floor", {}).get("wall_s")
    for name in ("loratool", "kohya", "floor"):
        r = results.get(name)
        if r is None:
            continue
        mean, worst = ratios(r["errors"], opt) if "errors" in r else (float("nan"),) * 2
        speed = f"{k / r['wall_s']:.1f}" if k else "—"
        floor = f"{r['wall_s'] / f:.2f}" if f else "—"
        lines.append(f"| {name} | {r['modules']} | {r['wall_s']:.1f} | {speed} | {floor} | {r.get('cpu_s', 0):.0f} | "
                     f"{r['rss_gib']:.2f} | "
                     f"{r['gpu_gib']:.2f} | {mean:.4f} | {worst:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=list(LAYOUTS), default="sd1")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--targets", default="attn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--niter", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--methods", default="floor,loratool,kohya")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keyshapes", default=str(REPO.parent / "shared" / "fixtures" / "real" / "keyshapes"))
    p.add_argument("--json-out", default=None)
    p.add_argument("--one", choices=list(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--tuned", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        args.workdir = tmp
        t0 = time.perf_counter()
        base, tuned = write_pair(args.arch, Path(tmp), Path(args.keyshapes), args.device)
        gen_s = time.perf_counter() - t0
        print(f"files written in {gen_s:.0f} s", flush=True)
        results = {}
        for m in args.methods.split(","):
            results[m] = child(m, base, tuned, args)
            print(f"{m}: {results[m]['wall_s']:.1f} s", flush=True)
        text = table(results, args, gen_s, (base.stat().st_size, tuned.stat().st_size))
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"table": text, **{k: {kk: vv for kk, vv in v.items()
                                        if kk not in ("errors", "optimal")} for k, v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
