"""The memory of fine-tuning SD1.5, split into its parts: ``python bench/train/claims.py SPEC.json RESULT.json``.

Measures, on one CUDA device, for a batch of one 512² image (no prior preservation) and the UNet + text
encoder trained (the VAE frozen):

* a full fine-tune in fp32, and in mixed precision (fp32 weights, fp16 autocast, grad scaler) — plain
  PyTorch here, since loratool trains adapters only;
* loratool's LoRA at the ranks in SPEC (fp16 mixed precision, as ``loratool train``), and TriLoRA at one.

Each is split into weights (every parameter on the GPU), gradients, optimizer state (AdamW's moments,
fused), and the rest of a step's peak: activations and temporaries, ``peak - (what is held between
steps)``. Gradients and optimizer state are the sizes of the tensors themselves; "held" is
``torch.cuda.memory_allocated()`` after a first step, the peak ``max_memory_allocated()`` of a second.
"""

from __future__ import annotations

import gc
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

DEV = torch.device("cuda")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return nbytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.device.type == "cuda")


def split(step, params, weights: int, opt: torch.optim.Optimizer) -> dict:
    """Run two steps; the parts of the second one's peak."""
    step()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    grads = nbytes(p.grad for p in params if p.grad is not None)
    optimizer = state_bytes(opt)
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "held": held,
            "activations": peak - held, "peak": peak, "reserved": torch.cuda.max_memory_reserved()}


def full_finetune(model: str, precision: str) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(DEV, torch.float32).train()
    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(DEV, torch.float32).train()
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(DEV, torch.float32).requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tok = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    ids = tok(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(DEV)
    params = [*unet.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    autocast = torch.autocast("cuda", dtype=torch.float16) if precision == "fp16" else nullcontext()
    gen = torch.Generator(DEV).manual_seed(0)
    pixels = torch.rand(1, 3, 512, 512, device=DEV, generator=gen) * 2 - 1

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (1,), device=DEV)
            pred = unet(sched.add_noise(latents, noise, t), t, te(ids)[0]).sample
        loss = F.mse_loss(pred.float(), noise)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    weights = nbytes([*params, *vae.parameters()])
    return split(step, params, weights, opt)


def lora(spec: dict, adapter: str, rank: int) -> dict:
    from loratool.train.config import TrainConfig
    from loratool.train.loop import Trainer

    cfg = TrainConfig(model=spec["model"], instance_data=spec["instance"], instance_prompt="a photo of sks dog",
                      output=spec["out"], adapter=adapter, rank=rank, targets=("unet", "text_encoder"),
                      batch_size=1, resolution=512, mixed_precision="fp16", steps=10, lr=1e-4)
    tr = Trainer(cfg, DEV)
    on_gpu = [p for m in tr.base.components.values() for p in m.parameters() if p.device.type == "cuda"]
    result = split(tr._step, tr._params, nbytes(on_gpu), tr.optimizer)
    from loratool.train.memory import estimate

    result["predicted"] = estimate(cfg).as_dict()
    return result


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    runs = [(f"full fine-tune, {p}", lambda p=p: full_finetune(spec["model"], p))
            for p in (("fp32", "fp16") if spec.get("full", True) else ())]
    runs += [(f"LoRA rank {r}", lambda r=r: lora(spec, "lora", r)) for r in spec["lora_ranks"]]
    runs += [(f"TriLoRA rank {r}", lambda r=r: lora(spec, "trilora", r)) for r in spec["trilora_ranks"]]
    results = {}
    for name, run in runs:
        try:
            results[name] = run()
        except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
