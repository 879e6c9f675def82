"""The settings of one training run, checked before anything heavy is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from loratool.errors import LoraToolError
from loratool.train.data import IMAGE_SUFFIXES
from loratool.train.layers import ADAPTERS, FOLDS, LAYER_SETS, TRILORA_INITS

COMPONENTS = ("unet", "text_encoder", "vae")
PRECISIONS = ("no", "fp16", "bf16")
OUTPUT_FORMATS = ("kohya", "diffusers", "peft")


@dataclass
class TrainConfig:
    model: str
    instance_data: str
    instance_prompt: str
    output: str
    class_data: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    adapter: str = "lora"
    rank: int = 8
    alpha: float | None = None
    trilora_init: str = "svd"
    fold: str = "balanced"
    targets: tuple[str, ...] = ("unet",)
    caption_extension: str | None = None  # sidecar captions, e.g. ".txt" (kohya's caption_extension)
    unet_layers: str = "attn"  # the --targets layer set (LAYER_SETS): UNet and text-encoder layers
    new_tokens: tuple[str, ...] = ()
    init_token: str | None = None
    steps: int = 500
    lr: float = 1e-4
    text_encoder_lr: float | None = None
    batch_size: int = 1
    resolution: int | None = None  # None: the model's native size (BaseModel.native_resolution)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0
    resume: str | None = None
    sample_prompts: tuple[str, ...] = ()
    sample_every: int = 0
    sample_steps: int = 25
    output_format: str = "kohya"
    output_name: str = "lora"
    tokenizer: str | None = None  # single-file checkpoints: a CLIP tokenizer folder
    model_config: str | None = None  # single-file checkpoints: a diffusers folder of configs to use instead of ours
    cache: bool = True  # latents (and, with the text encoders frozen, their outputs) computed once
    channels_last: bool = False  # the UNet's convolutions in NHWC layout
    recompute_pointwise: bool = False  # GroupNorm+SiLU and GEGLU recomputed in the backward (train/recompute.py)
    compile_unet: bool = False  # the UNet's training forward (and its backward) through torch.compile
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """One clear error for the first setting that cannot work."""
        if self.adapter not in ADAPTERS:
            raise LoraToolError(f"--adapter must be one of {', '.join(ADAPTERS)}, not {self.adapter!r}")
        if self.trilora_init not in TRILORA_INITS:
            raise LoraToolError(f"--trilora-init must be one of {', '.join(TRILORA_INITS)}")
        if self.fold not in FOLDS:
            raise LoraToolError(f"--fold must be one of {', '.join(FOLDS)}")
        bad = [t for t in self.targets if t not in COMPONENTS]
        if bad or not self.targets:
            raise LoraToolError(f"--components takes a comma list of {', '.join(COMPONENTS)} "
                                f"(got {','.join(self.targets)})")
        if self.unet_layers not in LAYER_SETS:
            raise LoraToolError(f"--targets must be one of {', '.join(LAYER_SETS)}, not {self.unet_layers!r}")
        if self.caption_extension is not None:
            ext = self.caption_extension
            if not ext.lstrip(".") or "/" in ext or "\\" in ext:
                raise LoraToolError(f"--caption-extension {ext!r} is not a file extension (e.g. .txt)")
            if ext.lower().endswith(IMAGE_SUFFIXES):
                raise LoraToolError(f"--caption-extension {ext!r} is an image extension")
            self.caption_extension = ext if ext.startswith(".") else f".{ext}"
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise LoraToolError(f"--resolution {self.resolution} is not a positive multiple of 8")
        if self.rank < 1:
            raise LoraToolError(f"-r/--rank must be at least 1, not {self.rank}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise LoraToolError(f"--{name.replace('_', '-')} must be at least 1")
        if self.mixed_precision not in PRECISIONS:
            raise LoraToolError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise LoraToolError(f"--to must be one of {', '.join(OUTPUT_FORMATS)}")
        if self.compile_unet and self.recompute_pointwise:
            raise LoraToolError("--compile and --recompute-pointwise do not combine: the compiled step chooses "
                                "what its backward pass recomputes")
        if (self.class_data is None) != (self.class_prompt is None):
            raise LoraToolError("prior preservation needs both --class-data and --class-prompt")
        if self.init_token and not self.new_tokens:
            raise LoraToolError("--init-token needs --new-tokens")
        for t in self.new_tokens:
            if t not in self.instance_prompt:
                raise LoraToolError(f"new token {t!r} does not appear in --instance-prompt")
        if not Path(self.model).exists():
            raise LoraToolError("model path does not exist", self.model)
        if Path(self.model).is_dir() and (self.tokenizer or self.model_config):
            raise LoraToolError("--tokenizer/--config are for single-file checkpoints; a diffusers folder has "
                                "its own", self.model)

    def as_dict(self) -> dict:
        return asdict(self)
