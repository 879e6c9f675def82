"""``loratool train --dry-run``: the peak GPU memory a run would allocate, predicted without a GPU.

The run is set up on the meta device exactly as it would be on CUDA (the same Trainer code, with shapes
and dtypes but no values: loratool.train.loop, ``dry_run=True``), then one training step — the forward
pass, the loss and the backward pass — is traced with CUDA's autocast emulated (loratool.train.trace).
The prediction is the larger of:

* training: the weights kept on the GPU (frozen ones in the mixed-precision dtype) + the adapter's fp32
  factors + AdamW's two fp32 moments + the caches + the traced step's peak (activations kept for the
  backward pass, gradients, temporaries);
* setup: filling the caches, with the fp32 VAE (then the text encoders) alone on the GPU, one chunk of
  images at a time.

It predicts ``torch.cuda.max_memory_allocated``. A card needs more: the CUDA context (about 0.5 GiB) and
the allocator's reserve (``max_memory_reserved`` minus allocated); bench/train_speed.py measures both
beside the prediction. Generating missing class images is not included (it runs the whole pipeline in
fp32 once, before training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from loratool.train.config import TrainConfig
from loratool.train.trace import MemoryTrace, storage_bytes

GIB = 2**30
CONTEXT_BYTES = GIB // 2  # the CUDA context and its kernels, outside PyTorch's allocator (approximate)


@dataclass
class MemoryEstimate:
    weights: int  # frozen weights (and buffers) on the GPU during training
    adapter: int  # the trained factors
    optimizer: int  # AdamW's moments
    caches: int  # latents and text conditioning
    step: int  # a step's activations, gradients and temporaries at their peak
    setup: int  # the peak while the caches are filled

    @property
    def training(self) -> int:
        return self.weights + self.adapter + self.optimizer + self.caches + self.step

    @property
    def peak(self) -> int:
        return max(self.training, self.setup)

    def as_dict(self) -> dict:
        return {**asdict(self), "training": self.training, "peak": self.peak}


def _bytes(tensors) -> int:
    return sum(storage_bytes(t) for t in {t.untyped_storage()._cdata: t for t in tensors}.values())


def _traced(existing, run) -> int:
    trace = MemoryTrace(existing)
    with trace:
        run()
    return trace.peak


def estimate(cfg: TrainConfig) -> MemoryEstimate:
    """The peak memory of training ``cfg`` on one CUDA device (class-image generation aside)."""
    from loratool.train import cache
    from loratool.train.loop import Trainer
    from loratool.train.model import tokenize

    tr = Trainer(cfg, torch.device("cuda"), dry_run=True)
    base, comps = tr.base, tr.base.components
    on_gpu = [t for name in tr.on_device for m in [comps[name]] for t in [*m.parameters(), *m.buffers()]]
    trained = {id(p) for p in tr._params}
    frozen = [t for t in on_gpu if id(t) not in trained]
    objective = tr.objective  # what every step reads from the device
    kept = [objective.prompt_of_image, objective.alphas_cumprod, *(objective.tokens or []),
            *([] if objective.time_ids is None else [objective.time_ids])]
    cached = [] if tr.latents is None else [tr.latents.mean, tr.latents.std]
    if tr.texts is not None:
        cached += [tr.texts.states] + ([] if tr.texts.pooled is None else [tr.texts.pooled])
    existing = [*on_gpu, *tr._params, *kept, *cached]

    def step() -> None:
        objective.loss().backward()

    adapter = _bytes(tr._params)
    estimate_ = MemoryEstimate(weights=_bytes(frozen) + _bytes(kept), adapter=adapter, optimizer=2 * adapter,
                               caches=_bytes(cached), step=_traced(existing, step), setup=0)
    if tr.latents is not None:
        vae = base.vae.to(torch.float32)  # the caches are filled before the frozen weights are cast
        pixels = torch.empty(1, 3, cfg.resolution, cfg.resolution, device="meta")
        chunk = min(len(tr.latents.mean), max(1, 2**18 // cfg.resolution**2))  # as cache.encode_latents
        peak = _traced(vae.parameters(), lambda: cache.encode_latents(vae, pixels.expand(chunk, -1, -1, -1), tr.device))
        estimate_.setup = _bytes(vae.parameters()) + peak
    if tr.texts is not None:
        params = [p for te in base.text_encoders for p in te.to(torch.float32).parameters()]
        tokens = [tokenize(tok, tr.prompts, tr.device) for tok in base.tokenizers]
        peak = _traced(params, lambda: cache.encode_texts(base, tokens, tr.autocast))
        estimate_.setup = max(estimate_.setup, _bytes(params) + peak)
    return estimate_


def needed_card_bytes(peak: int, reserve: float = 0.10) -> int:
    """A card size that holds ``peak`` allocated bytes: the allocator's reserve on top, and the context."""
    return int(peak * (1 + reserve)) + CONTEXT_BYTES
