"""DreamBooth-LoRA / TriLoRA training: setting up a run, then running it step by step.

A step computes the loss (what it minimises: loratool.train.objective), then clips the gradient norm and
takes an AdamW step (fused on CUDA). On CUDA a step never waits for the GPU: the loss stays on the device,
and :meth:`Trainer.run` reads the losses (and checks them) a few times a second.

Setup order (what is on the GPU when): the base loads on the CPU; the caches are filled with the VAE (fp32)
and the text encoders visiting the device; layers are adapted; under mixed precision the frozen weights
are cast on the CPU; then only what the step needs moves to the device (loratool.train.cache).
Several processes (torchrun, accelerate launch) train data parallel: loratool.train.parallel.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.utils.checkpoint

from loratool.errors import LoraToolError
from loratool.io.output import Outputs
from loratool.train import cache, checkpoint, data, parallel
from loratool.train.config import TrainConfig
from loratool.train.export import run_outputs
from loratool.train.layers import adapt, target_names
from loratool.train.model import add_tokens, load_base, skeleton_base, tokenize
from loratool.train.objective import Objective

Callback = Callable[[int, float, dict], None]
CPU = torch.device("cpu")
FLUSH_SECONDS = 0.5  # how often a CUDA run waits for its losses (to show and check them)


class Trainer:
    """One training run. ``dry_run=True`` builds it on the meta device (no weights, no images read) for
    tracing a step's memory (loratool.train.memory)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, outputs: Outputs | None = None,
                 dry_run: bool = False) -> None:
        cfg.check()
        self.cfg, self.dry_run = cfg, dry_run
        # every file goes through here (process 0 writes)
        self.outputs = outputs if outputs is not None or dry_run else run_outputs(cfg, force=True)
        if cfg.mixed_precision == "fp16" and device.type != "cuda" and not dry_run:
            raise LoraToolError("--mixed-precision fp16 needs a CUDA device")
        if dry_run:
            self.par, self.device = parallel.Parallel(), torch.device("meta")
        else:
            self.par, self.device = parallel.from_environment(device)
        if self.par.active and "vae" in cfg.targets:
            raise LoraToolError("--components vae is not supported with several processes")
        mixed = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        # frozen weights are stored in the mixed-precision dtype on CUDA (and when predicting CUDA's memory)
        self.frozen_dtype = mixed if (self.device.type == "cuda" or dry_run) else None
        self.autocast = self._autocast(mixed)
        self.out = Path(cfg.output)
        self.step_hook: Callable[[int], None] | None = None  # called after each step, without waiting
        if cfg.resolution is not None:  # bad images fail before the model loads
            self.instance, instance_prompts = self._instance_images()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if dry_run:
            self.base = skeleton_base(cfg.model, cfg.tokenizer, cfg.model_config)
        else:
            self.base = load_base(cfg.model, CPU, cfg.tokenizer, cfg.model_config)
        if cfg.resolution is None:
            cfg.resolution = self.base.native_resolution
            self.instance, instance_prompts = self._instance_images()
        self.token_ids = add_tokens(self.base, list(cfg.new_tokens), cfg.init_token) if cfg.new_tokens else []
        self.klass, class_prompts = self._class_images() if cfg.class_data else (None, None)
        self.examples = data.Examples(self.instance, instance_prompts, self.klass, class_prompts)
        self.prompts, prompt_of_image = self.examples.prompt_table()
        self.latents, self.texts = self._caches()
        self.layers = self._adapt()
        self.on_device = self._place()
        self.optimizer = self._optimizer()
        self._params = self.params()
        self.scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" and not dry_run else None
        if cfg.gradient_checkpointing or cfg.recompute_pointwise:
            from loratool.train.recompute import enable

            enable(cfg, self.base, self.autocast if dry_run else None)
        self.objective = Objective(cfg, self.base, self.examples, self.latents, self.texts, self.prompts,
                                   prompt_of_image, self.par, self.device, self.autocast, self.gen, dry_run)
        self.step_no, self.losses = 0, []
        if cfg.resume:
            self._resume(Path(cfg.resume))

    # -- setup -------------------------------------------------------------------------------
    def _autocast(self, dtype: torch.dtype | None):
        if dtype is None:
            return nullcontext()
        if self.dry_run:
            from loratool.train.trace import EmulatedAutocast

            return EmulatedAutocast(dtype)
        return torch.autocast(self.device.type, dtype=dtype)

    def _instance_images(self) -> tuple[torch.Tensor, list[str]]:
        cfg = self.cfg
        return data.load_captioned(cfg.instance_data, cfg.resolution, "instance image folder", cfg.instance_prompt,
                                   cfg.caption_extension, pixels=not self.dry_run)

    def _class_images(self) -> tuple[torch.Tensor, list[str] | str]:
        cfg, folder = self.cfg, Path(self.cfg.class_data)
        if folder.exists() and not folder.is_dir():
            raise LoraToolError("class image folder is not a folder", folder)
        have = len(data.image_files(folder, "class image folder", allow_empty=True)) if folder.exists() else 0
        if have < cfg.num_class_images:
            if self.dry_run:  # they would be generated
                res = cfg.resolution
                return torch.empty(cfg.num_class_images, 3, res, res, device="meta"), cfg.class_prompt
            if self.par.is_main:
                with cache.placed(list(self.base.components.values()), self.device):
                    data.generate_class_images(self.base.pipeline(), folder, cfg.class_prompt, cfg.num_class_images,
                                               cfg.resolution, cfg.seed, steps=cfg.sample_steps)
            self.par.barrier()
        return data.load_captioned(folder, cfg.resolution, "class image folder", cfg.class_prompt,
                                   cfg.caption_extension, pixels=not self.dry_run)

    def _caches(self) -> tuple[cache.LatentCache | None, cache.TextCache | None]:
        """Latents of every image and, with the text encoders frozen, every prompt's conditioning."""
        if not self.cfg.cache:
            return None, None
        base, dev = self.base, self.device
        pixels = self.instance if self.klass is None else torch.cat([self.instance, self.klass])
        with cache.placed([base.vae], dev):
            latents = cache.encode_latents(base.vae, pixels, dev)
        texts = None
        if "text_encoder" not in self.cfg.targets and not self.token_ids:
            with cache.placed(base.text_encoders, dev):
                tokens = [tokenize(tok, self.prompts, dev) for tok in base.tokenizers]
                texts = cache.encode_texts(base, tokens, self.autocast)
        return latents, texts

    def _adapt(self) -> dict:
        cfg, layers = self.cfg, {}
        for component, model in self.base.components.items():
            wanted = component if not component.startswith("text_encoder") else "text_encoder"
            if wanted not in cfg.targets:
                continue
            names = target_names(model, component, cfg.unet_layers)
            if not names:
                raise LoraToolError(f"--components {component}: no layers to adapt in this model", cfg.model)
            for name, layer in adapt(model, names, cfg.adapter, cfg.rank, cfg.alpha, cfg.trilora_init, self.gen).items():
                layers[f"{component}.{name}"] = layer
        if self.frozen_dtype is not None:
            for model in self.base.components.values():
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(self.frozen_dtype)
        return layers

    def _place(self) -> list[str]:
        """Move what each step needs to the device, the rest to the CPU; the names of those on the device."""
        cfg = self.cfg
        keep = ["unet"]
        if self.latents is None or "vae" in cfg.targets:
            keep.append("vae")
        if self.texts is None:
            keep += [n for n in self.base.components if n.startswith("text_encoder")]
        if not self.dry_run:
            for name, model in self.base.components.items():
                model.to(self.device if name in keep else CPU)
        if cfg.channels_last:
            self.base.unet.to(memory_format=torch.channels_last)
        return keep

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.lr
        groups: dict[str, list] = {"unet": [], "text_encoder": [], "vae": []}
        for key, layer in self.layers.items():
            comp = key.split(".", 1)[0]
            groups["text_encoder" if comp.startswith("text_encoder") else comp] += list(layer.factors().values())
        params = [{"params": groups["unet"] + groups["vae"], "lr": cfg.lr, "weight_decay": 1e-2},
                  {"params": groups["text_encoder"], "lr": te_lr, "weight_decay": 1e-2}]
        if self.token_ids:
            table = self.base.text_encoders[0].get_input_embeddings().weight
            table.requires_grad_(True)
            keep = torch.zeros(table.shape[0], 1, device=table.device)
            keep[self.token_ids] = 1.0
            table.register_hook(lambda g: g * keep.to(g.dtype))  # only the new rows learn
            params.append({"params": [table], "lr": te_lr, "weight_decay": 0.0})
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel for every factor
        return torch.optim.AdamW([g for g in params if g["params"]], betas=(0.9, 0.999), eps=1e-8, **fused)

    def close(self) -> None:
        """End the run's part in a process group: drop the DDP wrappers, then leave the group."""
        self.objective.unwrap()
        gc.collect()
        self.par.finish()

    def _resume(self, folder: Path) -> None:
        checkpoint.check_compatible(folder, checkpoint.run_meta(self.cfg))
        table = self.base.text_encoders[0].get_input_embeddings().weight if self.token_ids else None
        rows = dict(enumerate(self.token_ids))
        self.step_no, self.losses = checkpoint.load(folder, self.layers, rows, table, self.optimizer, self.gen)

    def new_embeddings(self) -> dict[int, torch.Tensor]:
        if not self.token_ids:
            return {}
        table = self.base.text_encoders[0].get_input_embeddings().weight
        return {i: table[row] for i, row in enumerate(self.token_ids)}

    def save_checkpoint(self, folder: Path) -> Path:
        return checkpoint.save(folder, self.layers, self.new_embeddings(), checkpoint.run_meta(self.cfg),
                               self.optimizer, self.step_no, self.gen, self.losses, self.outputs)

    # -- training ----------------------------------------------------------------------------
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _step(self) -> torch.Tensor:
        """One optimizer step; the loss (averaged over the processes) stays on the device."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.objective.loss()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # fused AdamW skips a step with inf/NaN gradients on the device
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step_no += 1
        return self.par.mean(loss.detach())

    def _record(self, pending: list[torch.Tensor]) -> list[float]:
        """Wait for the device once, check the losses of the last steps and add them to the history."""
        if not pending:
            return []
        values = torch.stack(pending).float().cpu().tolist()
        first = self.step_no - len(values) + 1
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise LoraToolError(f"the loss became {v} at step {first + i} (try a lower --lr)")
        self.losses += values
        return values

    def step(self) -> float:
        """One step, its loss read back (an error if it is not finite)."""
        return self._record([self._step()])[0]

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        """Images ``[N, 3, res, res]`` in [0, 1] from the adapted model."""
        base = self.base
        with cache.placed([base.vae, *base.text_encoders], self.device):
            pipe = base.pipeline()
            gens = [torch.Generator(self.device).manual_seed(seed + i) for i in range(len(prompts))]
            with self.autocast:
                out = pipe(prompts, height=self.cfg.resolution, width=self.cfg.resolution, guidance_scale=5.0,
                           num_inference_steps=self.cfg.sample_steps, generator=gens, output_type="pt")
        return out.images.float().cpu()

    def save_samples(self) -> Path:
        imgs = self.sample(list(self.cfg.sample_prompts), seed=self.cfg.seed)
        grid = torch.cat(list(imgs), dim=2)  # one row, prompts left to right
        path = self.out / "samples" / f"step_{self.step_no:06d}.png"
        with self.outputs.file(path) as fh:
            data.save_image(grid, fh)
        return path

    def run(self, callback: Callback | None = None) -> dict:
        """Train to ``cfg.steps``; checkpoints and samples on schedule; returns a summary."""
        cfg, start, main = self.cfg, time.time(), self.par.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        first, cuda = self.step_no, self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        stepping, pending, last_read = 0.0, [], time.time()  # stepping: seconds in steps (not sampling/saving)
        while self.step_no < cfg.steps:
            t0 = time.time()
            pending.append(self._step())
            if self.step_hook:
                self.step_hook(self.step_no)
            save = bool(cfg.save_every) and self.step_no % cfg.save_every == 0 and self.step_no < cfg.steps
            show = bool(cfg.sample_prompts) and bool(cfg.sample_every) and self.step_no % cfg.sample_every == 0
            values = []
            if not cuda or save or show or self.step_no == cfg.steps or time.time() - last_read >= FLUSH_SECONDS:
                values, pending, last_read = self._record(pending), [], time.time()
            stepping += time.time() - t0
            info = {"elapsed": stepping, "done": self.step_no - first}
            if save and main:
                info["checkpoint"] = str(self.save_checkpoint(self.out / f"checkpoint-{self.step_no:06d}"))
            if show and main:
                info["samples"] = str(self.save_samples())
            for i, value in enumerate(values if callback else []):
                step = self.step_no - len(values) + 1 + i
                callback(step, value, info if step == self.step_no else {"elapsed": stepping, "done": step - first})
        elapsed = time.time() - start
        summary = {"steps": self.step_no, "resumed_from": first, "seconds": round(elapsed, 2),
                   "it_per_s": round((self.step_no - first) / stepping, 3) if stepping else None,
                   "final_loss": self.losses[-1] if self.losses else None,
                   "mean_loss_last_10": sum(self.losses[-10:]) / max(1, len(self.losses[-10:])),
                   "trainable_parameters": sum(p.numel() for p in self._params),
                   "adapted_layers": len(self.layers), "processes": self.par.world,
                   "examples_per_step": cfg.batch_size * self.par.world,
                   "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
                   if cuda else None,
                   "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
                   if cuda else None}
        if main:
            self.outputs.write_json(self.out / "losses.json", self.losses)
        return summary
