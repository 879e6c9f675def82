"""One benchmark run of diffusers' DreamBooth-LoRA script: ``python bench/train/peer.py SPEC.json RESULT.json``.

The script (../shared/peers/diffusers-dreambooth, unmodified) is loaded as a module and its ``main`` runs
with the arguments below. Three things are wrapped from outside, none of its code changed:

* its progress bar (``tqdm``): each ``update`` marks the end of a step (bench/train/timing.py) — the same
  boundary as ours, after the optimizer step;
* ``save_lora_weights``: after the LoRA file is written the run stops (the script would then load the
  whole pipeline again for a final inference, which is not training);
* ``torchvision`` on a machine without it: a small stand-in (bench/train/tv_shim).

The settings follow ours: the same folder, images, prompts, resolution, batch, rank, learning rate,
precision and checkpointing; prior preservation on; centre crops; a constant rate. Where the script has
an option that saves work we also do (``--pre_compute_text_embeddings`` for SD1.5 with a frozen text
encoder; the SDXL script does this by itself), it is on. Its data loader keeps its default of no workers.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
PEERS = Path(os.environ.get("DREAMBOOTH_PEER_DIR", HERE.parents[2] / "shared" / "peers" / "diffusers-dreambooth"))


class Finished(Exception):
    """Raised once the LoRA is saved: the benchmark has what it needs."""


def arguments(spec: dict) -> list[str]:
    args = ["--pretrained_model_name_or_path", spec["model"], "--instance_data_dir", spec["instance"],
            "--instance_prompt", "a photo of sks dog", "--with_prior_preservation", "--class_data_dir",
            spec["class_dir"], "--class_prompt", "a photo of a dog", "--num_class_images", str(spec["n_class"]),
            "--output_dir", spec["out"], "--resolution", str(spec["resolution"]), "--center_crop",
            "--train_batch_size", str(spec["batch"]), "--max_train_steps", str(spec["warmup"] + spec["timed"]),
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--rank", str(spec["rank"]), "--mixed_precision", spec["precision"], "--seed", "0",
            "--checkpointing_steps", "1000000", "--report_to", spec.get("report_to", "tensorboard")]
    if spec["checkpointing"]:
        args.append("--gradient_checkpointing")
    if spec["text_encoder"]:
        args.append("--train_text_encoder")
    elif spec["arch"] == "sd15":
        args.append("--pre_compute_text_embeddings")
    return args


def load_script(arch: str):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(HERE / "tv_shim"))
    name = "train_dreambooth_lora_sdxl.py" if arch == "sdxl" else "train_dreambooth_lora.py"
    spec = importlib.util.spec_from_file_location("dreambooth_peer", PEERS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(spec_path: str, result_path: str) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from timing import StepClock

    spec = json.loads(Path(spec_path).read_text())
    script = load_script(spec["arch"])
    clock = StepClock(STARTED, spec.get("profile"), spec["warmup"])

    class TimedBar(script.tqdm):
        def update(self, n=1):
            clock.mark()
            return super().update(n)

    def stop_after(mixin):
        save = mixin.save_lora_weights.__func__

        def wrapped(cls, *args, **kwargs):
            save(cls, *args, **kwargs)
            raise Finished

        mixin.save_lora_weights = classmethod(wrapped)

    for mixin in (StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin):
        stop_after(mixin)
    script.tqdm = TimedBar
    script.args = script.parse_args(arguments(spec))  # its dataset reads the module-level name, as under __main__
    try:
        script.main(script.args)
    except Finished:
        pass
    lora = Path(spec["out"]) / "pytorch_lora_weights.safetensors"
    result = {"trainer": "diffusers", **clock.result(spec["warmup"], spec["batch"] * 2),
              "lora_bytes": lora.stat().st_size}
    Path(result_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
