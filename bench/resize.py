"""Benchmark: `loratool resize` (factored SVD) beside densify + full SVD (kohya's resize_lora algorithm).

Builds a LoCon adapter in memory with the module shapes of an architecture table (SDXL: U-Net
attention + convs and both text encoders, 1052 modules) at rank 128, fp16, with factor spectra
decaying like i^-0.8 and alpha = 64, then resizes it to rank 32 both ways on the same device:

* loratool — ops.resize: QR of each factor, SVD of the small core (the dense ΔW is never built);
* densify  — kohya's reference/kohya.md §3.2: W = up @ down, full torch.linalg.svd(W), U·S and Vh.

Both are exact truncations, so their errors must agree; the table shows mean error and the largest
relative difference between the two per module.

    python bench/resize.py --arch sdxl --rank-in 128 --rank 32 --device cuda
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from loratool.core.modules import Adapter, LoraModule, flat2d


def build(arch: str, rank: int, limit: int | None, seed: int = 0) -> Adapter:
    from loratool.arch import load_arch

    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(base_model=arch)
    decay = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.8
    for spec in load_arch(arch).targets("attn+conv")[:limit]:
        out, inp = spec.shape[0], math.prod(spec.shape[1:])
        r = min(rank, out, inp)
        down = torch.randn(r, inp, generator=gen) / math.sqrt(inp)
        up = torch.randn(out, r, generator=gen) * decay[:r] * 0.1
        if len(spec.shape) == 4:
            down, up = down.reshape(r, *spec.shape[1:]), up.reshape(out, r, 1, 1)
        adapter.add(LoraModule(component=spec.component, path=spec.path, alpha=64.0, down=down.half(), up=up.half()))
    return adapter


def densify_resize(adapter: Adapter, rank: int, device: str) -> dict[str, float]:
    """kohya resize_lora: rebuild W, full SVD, keep the top ``rank``; returns the relative errors."""
    errors = {}
    for key, m in adapter.modules.items():
        up, down = flat2d(m.up).to(device).float(), flat2d(m.down).to(device).float()
        w = up @ down
        u, s, vh = torch.linalg.svd(w)  # full_matrices=True, as resize_lora calls it
        r = min(rank, s.shape[0])
        new_up = (u[:, :r] * s[:r]).cpu()
        new_down = vh[:r].cpu()
        s64 = s.double()
        errors[key] = float(s64[r:].square().sum().sqrt() / s64.square().sum().sqrt())
        del new_up, new_down
    return errors


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return out, time.perf_counter() - t0, peak


def check_dense(adapter: Adapter, resized: Adapter, keys: list[str]) -> float:
    """Largest excess of our error over the float64 optimum, densified after timing, on a sample."""
    worst = 0.0
    for key in keys:
        d = adapter.modules[key].delta(torch.float64)
        d2 = d.reshape(d.shape[0], -1)
        s = torch.linalg.svdvals(d2)
        k = resized.modules[key].rank
        opt = float(s[k:].square().sum().sqrt())
        got = float((resized.modules[key].delta(torch.float64).reshape(d2.shape) - d2).norm())
        worst = max(worst, got / opt - 1 if opt > 0 else got)
    return worst


def main() -> None:
    from loratool.ops.resize import ResizeOptions, resize

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sdxl")
    p.add_argument("--rank-in", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=None, help="only the first N modules")
    p.add_argument("--skip-densify", action="store_true")
    args = p.parse_args()
    adapter = build(args.arch, args.rank_in, args.limit)
    n = len(adapter.modules)
    if args.device.startswith("cuda"):  # warm-up: context, cuSOLVER handles, kernels
        resize(build(args.arch, 8, 4), ResizeOptions(rank=2, device=args.device))
        densify_resize(build(args.arch, 8, 4), 2, args.device)
    res, t_ours, g_ours = timed(lambda: resize(adapter, ResizeOptions(rank=args.rank, device=args.device)),
                                args.device)
    ours = {r.key: r.rel_error for r in res.reports}
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    lines = [f"resize {args.arch} LoCon rank {args.rank_in} -> {args.rank}, {n} modules, on {dev}; "
             f"torch {torch.__version__}", "",
             "| method | wall s | × vs densify | peak GPU GiB | mean rel. error | max rel. error diff |",
             "| --- | --- | --- | --- | --- | --- |"]
    mean_ours = sum(ours.values()) / n
    if not args.skip_densify:
        base, t_base, g_base = timed(lambda: densify_resize(adapter, args.rank, args.device), args.device)
        diff = max(abs(ours[k] - base[k]) / base[k] for k in base if base[k] > 0)
        lines.append(f"| loratool (factored) | {t_ours:.2f} | {t_base / t_ours:.1f} | {g_ours:.2f} | "
                     f"{mean_ours:.5f} | {diff:.2e} |")
        lines.append(f"| densify + full SVD | {t_base:.2f} | 1.0 | {g_base:.2f} | "
                     f"{sum(base.values()) / n:.5f} | — |")
    else:
        lines.append(f"| loratool (factored) | {t_ours:.2f} | — | {g_ours:.2f} | {mean_ours:.5f} | — |")
    sample = list(adapter.modules)[:: max(1, n // 12)]
    lines.append(f"\nfloat64 check on {len(sample)} modules (densified after timing): our error exceeds "
                 f"the optimum by at most {check_dense(adapter, res.adapter, sample):.2e} (relative)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
