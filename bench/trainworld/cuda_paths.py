"""Exercise the CUDA-only trainer paths (fp16 with a grad scaler, bf16, gradient checkpointing) for a few
steps on the tiny model and print their losses, speed and peak memory.

    python bench/trainworld/cuda_paths.py
"""

from __future__ import annotations

import json
import tempfile

import torch

from loratool.train.config import TrainConfig
from loratool.train.loop import Trainer


def main() -> None:
    for precision in ("no", "fp16", "bf16"):
        for ckpt in (False, True):
            with tempfile.TemporaryDirectory() as out:
                cfg = TrainConfig(model="fixtures/tiny-sd", instance_data="fixtures/tiny-instance",
                                  instance_prompt="a sks shape", output=out, adapter="trilora", rank=8, steps=30,
                                  lr=1e-3, batch_size=8, resolution=32, targets=("unet", "text_encoder"),
                                  mixed_precision=precision, gradient_checkpointing=ckpt)
                s = Trainer(cfg, torch.device("cuda")).run()
                print(json.dumps({"precision": precision, "checkpointing": ckpt,
                                  "final_loss": s["final_loss"], "it_per_s": s["it_per_s"],
                                  "peak_mb": s["peak_gpu_memory_mb"]}), flush=True)


if __name__ == "__main__":
    main()
