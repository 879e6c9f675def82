"""One benchmark run of loratool's trainer: ``python bench/train/ours.py SPEC.json RESULT.json``.

SPEC (written by bench/train_speed.py) names the model folder, the data and the settings. The run is a
normal ``Trainer.run``; the end of every step is marked (bench/train/timing.py, through the trainer's step
hook) without making the host wait, beyond once after the first step (for the time to first step). After training it writes the LoRA as
``loratool train`` does and predicts the run's peak memory with the dry run (loratool.train.memory).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before torch is imported: the time to first step counts the imports

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def config(spec: dict):
    from loratool.train.config import TrainConfig

    return TrainConfig(
        model=spec["model"], instance_data=spec["instance"], instance_prompt="a photo of sks dog",
        class_data=spec["class_dir"], class_prompt="a photo of a dog", num_class_images=spec["n_class"],
        adapter=spec["adapter"], rank=spec["rank"], unet_layers=spec["layers"],
        targets=("unet", "text_encoder") if spec["text_encoder"] else ("unet",),
        steps=spec["warmup"] + spec["timed"], lr=1e-4, batch_size=spec["batch"], resolution=spec["resolution"],
        mixed_precision=spec["precision"], gradient_checkpointing=spec["checkpointing"], seed=0,
        output=spec["out"], cache=spec.get("cache", True), channels_last=spec.get("channels_last", False),
        recompute_pointwise=spec.get("recompute", False), compile_unet=spec.get("compile", False))


def main(spec_path: str, result_path: str) -> None:
    import torch
    from timing import StepClock

    from loratool.train.export import write_outputs
    from loratool.train.loop import Trainer

    spec = json.loads(Path(spec_path).read_text())
    cuda = torch.cuda.is_available()
    tr = Trainer(config(spec), torch.device("cuda" if cuda else "cpu"))
    setup = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (None, None)
    clock = StepClock(STARTED, spec.get("profile"), spec["warmup"])
    tr.step_hook = lambda step: clock.mark()
    summary = tr.run()  # resets the peak counters: the setup's peaks are kept above
    result = {"trainer": "ours", **clock.result(spec["warmup"], spec["batch"] * 2),
              "final_loss": summary["final_loss"], "trainable_parameters": summary["trainable_parameters"]}
    if cuda:
        result["train_peak_allocated"] = result["peak_allocated"]
        result["peak_allocated"] = max(setup[0], result["peak_allocated"])
        result["peak_reserved"] = max(setup[1], result["peak_reserved"])
    files = write_outputs(tr, summary, time.time())
    result["lora_bytes"] = Path(files["adapter"]).stat().st_size
    if spec.get("predict", True):
        from loratool.train.memory import estimate

        t0 = time.perf_counter()
        result["predicted"] = estimate(config({**spec, "out": spec["out"] + "-dry"})).as_dict()
        result["predict_s"] = time.perf_counter() - t0
    Path(result_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
