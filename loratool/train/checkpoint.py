"""The native, resumable training checkpoint: a folder with two files.

``adapter.safetensors`` — the trained factors under our own keys, unfolded:

* LoRA:    ``<component>.<path>.lora_down`` ``[r, in·kh·kw]`` and ``.lora_up`` ``[out, r]``;
* TriLoRA: ``<component>.<path>.trilora_A`` ``[r, in·kh·kw]``, ``.trilora_B`` ``[out, r]``, ``.trilora_C`` ``[r, r]``;
* new tokens: ``token_embedding.<index>`` ``[dim]`` (the index in the metadata's ``new_tokens`` list).

  Its metadata: ``loratool.format = "loratool-train-checkpoint"``, ``loratool.adapter`` (lora|trilora),
  ``loratool.rank``, ``loratool.alpha``, ``loratool.trilora_init``, ``loratool.targets`` and
  ``loratool.new_tokens`` (JSON lists), ``loratool.unet_layers`` (the --targets layer set, empty without a
  UNet or text-encoder adapter), ``loratool.step``.

``state.pt`` — what continuing needs: the optimizer state, the step, the loss history, and the
states of the data/noise generator, torch's CPU generator and (when used) CUDA's.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from loratool.errors import LoraToolError
from loratool.io.output import Outputs
from loratool.io.safetensors import SafetensorsFile
from loratool.train.config import TrainConfig

FORMAT = "loratool-train-checkpoint"


def run_meta(cfg: TrainConfig) -> dict[str, str]:
    """The metadata of a run's checkpoints: the settings a run resuming from one must share (what
    :func:`check_compatible` compares)."""
    return {"loratool.adapter": cfg.adapter, "loratool.rank": str(cfg.rank),
            "loratool.alpha": str(float(cfg.alpha if cfg.alpha is not None else cfg.rank)),
            "loratool.trilora_init": cfg.trilora_init if cfg.adapter == "trilora" else "",
            "loratool.targets": json_list(cfg.targets),
            "loratool.unet_layers": cfg.unet_layers if {"unet", "text_encoder"} & set(cfg.targets) else "",
            "loratool.new_tokens": json_list(cfg.new_tokens)}


def save(folder: Path, layers: dict, embeddings: dict[int, torch.Tensor], meta: dict[str, str],
         optimizer: torch.optim.Optimizer, step: int, gen: torch.Generator, losses: list[float],
         outputs: Outputs | None = None) -> Path:
    """Write a checkpoint folder through ``outputs`` (the run's; without one, a fresh one that may replace
    an old folder): built beside its place and swapped in as a whole, so it never mixes two steps."""
    outputs = outputs if outputs is not None else Outputs(force=True)
    tensors = {f"{key}.{name}": t.detach().float().cpu().contiguous()
               for key, layer in layers.items() for name, t in layer.factors().items()}
    tensors.update({f"token_embedding.{i}": row.detach().float().cpu().contiguous() for i, row in embeddings.items()})
    state = {"optimizer": optimizer.state_dict(), "step": step, "losses": list(losses),
             "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    buf = io.BytesIO()
    torch.save(state, buf)
    with outputs.folder(folder) as out:
        out.write_safetensors("adapter.safetensors", tensors, {**meta, "loratool.format": FORMAT, "loratool.step": str(step)})
        out.write_bytes("state.pt", buf.getvalue())
    return folder


def read_meta(folder: Path) -> dict[str, str]:
    path = Path(folder) / "adapter.safetensors"
    if not path.is_file():
        raise LoraToolError("not a loratool training checkpoint (no adapter.safetensors)", folder)
    meta = SafetensorsFile(path).metadata or {}
    if meta.get("loratool.format") != FORMAT:
        raise LoraToolError("not a loratool training checkpoint (wrong loratool.format)", path)
    return meta


def check_compatible(folder: Path, expected: dict[str, str]) -> None:
    """Refuse a checkpoint made with another adapter type, rank, alpha, init, targets or UNet layer set."""
    meta = read_meta(folder)
    for key, want in expected.items():
        have = meta.get(key)
        if have != want:
            name = key.removeprefix("loratool.")
            raise LoraToolError(f"--resume: the checkpoint's {name} is {have}, but this run asks for {want}", folder)


def load(folder: Path, layers: dict, embedding_rows: dict[int, int], table: torch.nn.Parameter | None,
         optimizer: torch.optim.Optimizer, gen: torch.Generator) -> tuple[int, list[float]]:
    """Put a checkpoint's factors, optimizer and RNG states back; returns (step, losses)."""
    f = SafetensorsFile(Path(folder) / "adapter.safetensors")
    with torch.no_grad():
        for key, layer in layers.items():
            for name, param in layer.factors().items():
                full = f"{key}.{name}"
                if full not in f.keys():
                    raise LoraToolError(f"--resume: the checkpoint has no {full}", folder)
                src = f.get(full)
                if tuple(src.shape) != tuple(param.shape):
                    raise LoraToolError(f"--resume: {full} is {tuple(src.shape)}, expected {tuple(param.shape)}", folder)
                param.copy_(src)
        for index, row in embedding_rows.items():
            table[row].copy_(f.get(f"token_embedding.{index}"))
    try:
        state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise LoraToolError(f"--resume: cannot read state.pt ({type(e).__name__})", folder) from None
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def json_list(items) -> str:
    return json.dumps(list(items))
