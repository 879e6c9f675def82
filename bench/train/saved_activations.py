"""What the SD1.5 UNet keeps for its backward pass under an attention LoRA, by the kind of operation that
keeps it, and how much recomputing the cheap element-wise parts would save (issue 18: the 0.8x memory goal).

The UNet is built from loratool's shipped config with random weights, all frozen but the attention
projections (which keep the same inputs a LoRA on them keeps). One forward at batch 1. By kind: the tensors
the autograd graph holds, counted by storage (views of one tensor count once), parameters excluded. By
variant: what the process holds after the forward beyond what it held before (resident memory, each variant
in a process of its own, glibc told to return every block over 64 KiB), since a recomputed region keeps its
inputs inside torch.utils.checkpoint, where the graph walk cannot see them. The plain variant's two counts
agree. Variants recompute, in the backward pass, GroupNorm+SiLU in the ResNet blocks and the GEGLU of the
feed-forwards, as ``loratool train --recompute-pointwise`` does (loratool/train/recompute.py); their outputs
are checked equal to the plain forward's.

Runs on the CPU: its attention kernel keeps the same q/k/v/output/logsumexp as CUDA's flash attention, so
the shares carry over to the GPU roughly, not exactly; the peak memory on a GPU is what bench/train_speed.py
measures.

    python bench/train/saved_activations.py [--latent 32]
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import subprocess
import sys

import torch

from loratool.train.recompute import recompute_pointwise


def build(latent: int):
    from diffusers import UNet2DConditionModel

    from loratool.train.single_file import shipped_configs

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(shipped_configs("sd1")["unet"]).eval()
    unet.requires_grad_(False)
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            module.weight.requires_grad_(True)
    inputs = (torch.randn(1, 4, latent, latent), torch.tensor([500]), torch.randn(1, 77, 768))
    return unet, inputs


def saved(unet, inputs) -> tuple[dict[str, int], torch.Tensor]:
    """Bytes kept for the backward pass by each kind of autograd node (each storage counted once)."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    out = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    seen: set[int] = set()
    by_kind: dict[str, int] = collections.Counter()
    todo, done = [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in done:
            continue
        done.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # freed or not a tensor
                continue
            for t in value if isinstance(value, tuple | list) else (value,):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in params and storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        by_kind[type(node).__name__] += storage.nbytes()
        todo.extend(n for n, _ in node.next_functions)
    return dict(by_kind), out.detach()


LABELS = {"resnet": "norm+silu", "geglu": "geglu"}


def _resident() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_after_forward(latent: int, variants: list[str]) -> int:
    """Bytes the process holds after one forward with ``variants`` recomputed (run in a fresh process)."""
    unet, inputs = build(latent)
    with torch.no_grad():
        reference = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    recompute_pointwise(unet, kinds=tuple(variants))
    gc.collect()
    before = _resident()
    out = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    gc.collect()
    held = _resident() - before
    if not torch.allclose(out.detach(), reference):
        raise SystemExit(f"recomputing {variants} changed the output")
    return held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latent", type=int, default=32, help="latent side (32: 256² images; 64: 512²)")
    ap.add_argument("--held", nargs="*", default=None, help=argparse.SUPPRESS)  # one variant, in a child
    args = ap.parse_args()
    if args.held is not None:
        print(held_after_forward(args.latent, args.held))
        return
    base, _ = saved(*build(args.latent))
    total = sum(base.values())
    print(f"SD1.5 UNet, batch 1, latent {args.latent}², fp32, attention projections trainable (CPU)\n")
    print("| kind of node | MiB kept | share |")
    print("|---|---|---|")
    for kind, n in sorted(base.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {n / 2**20:.1f} | {n / total:.1%} |")
    print(f"| all (graph walk) | {total / 2**20:.1f} | |")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print("\n| variant | MiB held after the forward | × plain |")
    print("|---|---|---|")
    plain = None
    for variants in ([], ["resnet"], ["geglu"], ["resnet", "geglu"]):
        run = subprocess.run([sys.executable, __file__, "--latent", str(args.latent), "--held", *variants],
                             env=env, capture_output=True, text=True, check=True)
        held = int(run.stdout.split()[-1])
        plain = plain or held
        name = " + ".join(LABELS[v] for v in variants) + " recomputed" if variants else "plain"
        print(f"| {name} | {held / 2**20:.1f} | {held / plain:.2f}× |")


if __name__ == "__main__":
    main()
