"""LyCORIS' extractor (PyPI lycoris-lora, ``lycoris.utils.extract_diff``) on modules of a checkpoint pair.

Runs in the peers' venv (bench/peers/setup.sh), not the project's. ``extract_diff`` walks two model
objects and decomposes every Linear/Conv2d whose weight changed (full ``torch.linalg.svd``, rank
``--rank``): here the "models" are module trees built from the safetensors pair, holding exactly the
weights listed in ``--modules`` (a JSON list of ``{"name", "segments": [[key, start, stop]], "shape"}``
from loratool's plan, so both tools see the same matrices). Prints one JSON line: seconds in
``extract_diff``, modules, and per module the error ``‖ΔW − up·down‖/‖ΔW‖`` over the Eckart–Young
optimum (measured after the clock stops).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors import safe_open


def weight(f, segments) -> torch.Tensor:
    parts = []
    for key, start, stop in segments:
        t = f.get_slice(key)
        parts.append(t[start:stop] if stop is not None else f.get_tensor(key))
    return torch.cat(parts).float()


def tree(path: str, modules: list[dict]) -> torch.nn.Module:
    """A module tree with a Linear/Conv2d at each listed name, holding that file's weight."""
    root = torch.nn.Module()
    with safe_open(path, "pt") as f:
        for spec in modules:
            w = weight(f, spec["segments"]).reshape(spec["shape"])
            layer = torch.nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False) if w.dim() == 4 \
                else torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            layer.weight = torch.nn.Parameter(w, requires_grad=False)
            parent = root
            *owners, leaf = spec["name"].split(".")
            for part in owners:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, layer)
    return root


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True)
    p.add_argument("--modules", required=True)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from lycoris.utils import extract_diff

    modules = json.loads(open(args.modules).read())
    base, tuned = tree(args.base, modules), tree(args.tuned, modules)
    t0 = time.perf_counter()
    out = extract_diff([], [], base, tuned, mode="fixed", linear_mode_param=args.rank,
                       conv_mode_param=args.rank, extract_device=args.device, small_conv=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ratios = {}
    for spec in modules:
        name = "lora_unet_" + spec["name"].replace(".", "_")
        if f"{name}.lora_down.weight" not in out:
            continue
        d = (dict(tuned.named_modules())[spec["name"]].weight - dict(base.named_modules())[spec["name"]].weight)
        d = d.double().reshape(d.shape[0], -1)
        up = out[f"{name}.lora_up.weight"].double().reshape(d.shape[0], -1)
        down = out[f"{name}.lora_down.weight"].double().reshape(up.shape[1], -1)
        s = torch.linalg.svdvals(d)
        opt = float(s[args.rank:].square().sum().sqrt() / s.square().sum().sqrt())
        if opt > 0:
            ratios[spec["name"]] = float((d - up @ down).norm() / d.norm()) / opt
    print("RESULT " + json.dumps({"seconds": seconds, "modules": len(ratios), "err_opt": list(ratios.values())}))


if __name__ == "__main__":
    main()
