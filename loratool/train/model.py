"""Loading the base model for training and turning prompts into conditioning.

A base model is a diffusers folder (``model_index.json``) of an SD1.x/SD2.x pipeline (one text
encoder) or an SDXL pipeline (two text encoders, pooled embeddings and size conditioning), or a
single-file ``.safetensors`` checkpoint of those, loaded offline from the configs we ship
(loratool.train.single_file; its tokenizer comes from ``--tokenizer DIR``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratool.errors import LoraToolError


@dataclass
class BaseModel:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: object  # DDPMScheduler with the model's betas
    sample_scheduler: object
    path: Path
    base_model: str  # sd1, sd2, sdxl
    extras: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.base_model == "sdxl"

    @property
    def native_resolution(self) -> int:
        """The pixel size the UNet was made for: its latent sample size times the VAE's downscaling."""
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        return {"unet": self.unet, "vae": self.vae, **dict(zip(names, self.text_encoders, strict=False))}

    def pipeline(self):
        """An inference pipeline that shares these (possibly adapted) modules."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.is_sdxl:
            pipe = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet,
                scheduler=self.sample_scheduler)
        else:
            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
                scheduler=self.sample_scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_base(path: str | Path, device: torch.device, tokenizer: str | Path | None = None,
              config: str | Path | None = None) -> BaseModel:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and schedulers, frozen, in fp32 on ``device``.

    ``tokenizer`` and ``config`` are for single-file checkpoints only (a tokenizer folder; a diffusers
    folder whose component configs replace the shipped ones)."""
    path = Path(path)
    if not path.exists():
        raise LoraToolError("model path does not exist", path)
    if path.is_file():
        return _load_single_file(path, device, tokenizer, config)
    if tokenizer is not None or config is not None:
        raise LoraToolError("--tokenizer/--config are for single-file checkpoints; a diffusers folder has its own",
                            path)
    return _load_folder(path, device)


def skeleton_base(path: str | Path, tokenizer: str | Path | None = None,
                  config: str | Path | None = None) -> BaseModel:
    """The base model's modules on the meta device (shapes and dtypes, no weights) with its real tokenizers
    and schedulers: what ``--dry-run`` needs to trace a training step without loading gigabytes."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from loratool.train.single_file import build_models, checkpoint_arch, load_configs, load_tokenizers

    path = Path(path)
    if not path.exists():
        raise LoraToolError("model path does not exist", path)
    if path.is_file():
        arch = checkpoint_arch(path)
        toks = load_tokenizers(arch, tokenizer, path)
        configs = load_configs(arch, config)
    else:
        configs, toks = _folder_configs(path)
        arch = "sdxl" if "text_encoder_2" in configs else (
            "sd2" if configs["unet"].get("cross_attention_dim") == 1024 else "sd1")
    models = build_models(arch, configs)
    for m in models.values():
        m.requires_grad_(False).eval()
    tes = [models["text_encoder"]] + ([models["text_encoder_2"]] if arch == "sdxl" else [])
    sched = configs["scheduler"]
    return BaseModel(models["unet"], models["vae"], tes, toks, DDPMScheduler.from_config(sched),
                     DDIMScheduler.from_config(sched), path, arch)


def _folder_configs(path: Path) -> tuple[dict, list]:
    """A diffusers folder's component configs and tokenizers (no weights read)."""
    from transformers import AutoTokenizer

    index = path / "model_index.json"
    if not index.is_file():
        raise LoraToolError("not a diffusers model folder (no model_index.json)", path)
    try:
        entries = json.loads(index.read_text())
        names = ["unet", "vae", "text_encoder"]
        if "text_encoder_2" in entries and entries["text_encoder_2"][0] is not None:
            names.append("text_encoder_2")
        configs = {n: json.loads((path / n / "config.json").read_text()) for n in names}
        configs["scheduler"] = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        toks = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer")]
        if "text_encoder_2" in configs:
            toks.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise LoraToolError(f"cannot read the model's configs ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                            path) from None
    return configs, toks


def _load_single_file(path: Path, device: torch.device, tokenizer, config) -> BaseModel:
    from diffusers import DDIMScheduler, DDPMScheduler

    from loratool.train.single_file import checkpoint_arch, load_single_file, load_tokenizers

    arch = checkpoint_arch(path)
    toks = load_tokenizers(arch, tokenizer, path)  # before the slow part: a missing --tokenizer fails at once
    models, configs = load_single_file(path, arch, config)
    tes = [models["text_encoder"]] + ([models["text_encoder_2"]] if arch == "sdxl" else [])
    for m in models.values():
        m.requires_grad_(False).eval().to(device)
    sched = configs["scheduler"]
    return BaseModel(models["unet"], models["vae"], tes, toks, DDPMScheduler.from_config(sched),
                     DDIMScheduler.from_config(sched), path, arch)


def _load_folder(path: Path, device: torch.device) -> BaseModel:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    index = path / "model_index.json"
    if not index.is_file():
        raise LoraToolError("not a diffusers model folder (no model_index.json)", path)
    try:
        entries = json.loads(index.read_text())
        sdxl = "text_encoder_2" in entries and entries["text_encoder_2"][0] is not None
        # no dtype argument (newer diffusers and transformers renamed torch_dtype, older ones reject dtype):
        # each module is cast to fp32 below, whatever the folder stores
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        tes = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
        toks = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer")]
        if sdxl:
            tes.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
            toks.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        sched_cfg = DDPMScheduler.load_config(path, subfolder="scheduler")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise LoraToolError(f"cannot load the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                            path) from None
    for m in (unet, vae, *tes):
        m.requires_grad_(False).eval().to(device=device, dtype=torch.float32)
    kind = "sdxl" if sdxl else ("sd2" if unet.config.cross_attention_dim == 1024 else "sd1")
    return BaseModel(unet, vae, tes, toks, DDPMScheduler.from_config(sched_cfg),
                     DDIMScheduler.from_config(sched_cfg), path, kind)


def tokenize(tok, prompts: list[str], device) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device)


def size_ids(resolution: int, n: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SDXL's size conditioning ``[n, 6]``: original size, crop corner (0, 0), target size."""
    ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype)
    return ids.to(device).repeat(n, 1)


def encode_tokens(base: BaseModel, tokens: list[torch.Tensor], time_ids: torch.Tensor | None = None,
                  encoders: list | None = None) -> tuple[torch.Tensor, dict | None]:
    """(encoder_hidden_states, added_cond_kwargs) for the UNet from each tokenizer's ids ``[n, 77]``.

    ``encoders`` replaces the text encoders as callables (e.g. their DistributedDataParallel wrappers);
    ``time_ids`` is SDXL's size conditioning (:func:`size_ids`)."""
    encoders = encoders or base.text_encoders
    if not base.is_sdxl:
        return encoders[0](tokens[0])[0], None
    states, pooled = [], None
    for te, ids in zip(encoders, tokens, strict=True):
        out = te(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # text_encoder_2's projected pooled output
    return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


def encode_prompts(base: BaseModel, prompts: list[str], resolution: int) -> tuple[torch.Tensor, dict | None]:
    """(encoder_hidden_states, added_cond_kwargs) for the UNet."""
    device = base.unet.device
    tokens = [tokenize(tok, prompts, device) for tok in base.tokenizers]
    time_ids = size_ids(resolution, len(prompts), device) if base.is_sdxl else None
    return encode_tokens(base, tokens, time_ids)


def add_tokens(base: BaseModel, tokens: list[str], init_token: str | None) -> list[int]:
    """Add new tokens to the (first) tokenizer and grow the embedding table; new rows start as the
    embedding of ``init_token`` (its first sub-token) or as the table's mean. Returns the new ids."""
    tok, te = base.tokenizers[0], base.text_encoders[0]
    for t in tokens:
        if t in tok.get_vocab():
            raise LoraToolError(f"--new-tokens: {t!r} is already in the tokenizer's vocabulary")
    tok.add_tokens(tokens)
    ids = tok.convert_tokens_to_ids(tokens)
    te.resize_token_embeddings(len(tok))
    table = te.get_input_embeddings().weight
    with torch.no_grad():
        if init_token:
            init_ids = tok(init_token, add_special_tokens=False).input_ids
            if not init_ids:
                raise LoraToolError(f"--init-token {init_token!r} tokenizes to nothing")
            row = table[init_ids[0]].clone()
        else:
            row = table[: min(ids)].mean(0)
        for i in ids:
            table[i] = row
    return ids
