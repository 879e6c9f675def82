"""Full-size base/tuned pairs for the extract benchmarks, random values in real key layouts.

Layouts (``LAYOUTS``):

* ``sd1``, ``sdxl``: single-file LDM/SGM checkpoints (../shared/fixtures/real/keyshapes/*_full.json,
  EMA left out), fp16; ``sd3``: the ComfyUI single file (MMDiT + CLIP-L, CLIP-G, T5), fp16;
  ``flux``: the BFL transformer alone (Flux.1-dev's ``model.diffusion_model.*`` part), bf16.
  Tuned = base + a fine-tune-like ΔW on every ≥2-D denoiser weight; text encoders and VAE unchanged.
* ``llama3-8b``, ``qwen2-0.5b``: Hugging Face model folders (``config.json`` + safetensors, sharded
  with an index for Llama), bf16, shapes from the published configs. Tuned = base + ΔW on every
  linear layer and the (untied) head; the input embedding is unchanged.

ΔW (``synthetic_delta``): a rank-q product with singular values ∝ i^-0.8 (‖·‖ ≈ 3 % of ‖W‖) plus dense
Gaussian noise (‖·‖ ≈ 0.5 % of ‖W‖). Values come from a seeded generator on the given device, and
both files are streamed to disk one tensor at a time (memory: one tensor).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
CHECKPOINTS = {"sd1": ("sd15_ldm_checkpoint_full.json", torch.float16, None),
               "sdxl": ("sdxl_sgm_checkpoint_full.json", torch.float16, None),
               "sd3": ("sd3_comfyui_checkpoint_full.json", torch.float16, None),
               "flux": ("flux_bfl_checkpoint_full.json", torch.bfloat16, "diffuser")}
LLMS = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=False, torch_dtype="bfloat16", shards=4, bias=False),
    "llama3-70b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       tie_word_embeddings=False, torch_dtype="bfloat16", shards=4, bias=False),
    "qwen2-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
                       intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       tie_word_embeddings=True, torch_dtype="bfloat16", shards=1, bias=True),
}
LAYOUTS = (*CHECKPOINTS, *LLMS)
DENOISER = ("model.diffusion_model.",)


def is_llm(layout: str) -> bool:
    return layout in LLMS


def checkpoint_table(layout: str, keyshapes: Path) -> list[tuple[str, tuple[int, ...], torch.dtype, bool]]:
    """(key, shape, dtype, changed) of a single-file checkpoint layout."""
    name, dtype, only = CHECKPOINTS[layout]
    data = json.loads((keyshapes / name).read_text())
    out = []
    for key, entry in data.items():
        if entry["component"] in ("ema", "scheduler") or (only and entry["component"] != only):
            continue
        shape = tuple(entry["shape"])
        stored = torch.int64 if entry["dtype"] == "int64" else dtype
        out.append((key, shape, stored, key.startswith(DENOISER) and len(shape) >= 2 and stored == dtype))
    return out


def llm_config(layout: str, layers: int | None = None) -> dict:
    """The published config numbers, with ``layers`` decoder layers when given (a per-layer measurement
    to scale from: the 70B pair does not fit the device's disk)."""
    c = dict(LLMS[layout])
    if layers:
        c["num_hidden_layers"] = layers
    return c


def llm_table(layout: str, layers: int | None = None) -> list[tuple[str, tuple[int, ...], torch.dtype, bool]]:
    """(key, shape, dtype, changed) of an HF causal LM from its config numbers."""
    c = llm_config(layout, layers)
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    dt = torch.bfloat16
    out = [("model.embed_tokens.weight", (v, h), dt, False)]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            out.append((f"{p}{name}.weight", shape, dt, True))
            if c["bias"] and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                out.append((f"{p}{name}.bias", shape[:1], dt, False))
        out += [(f"{p}input_layernorm.weight", (h,), dt, False), (f"{p}post_attention_layernorm.weight", (h,), dt, False)]
    out.append(("model.norm.weight", (h,), dt, False))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h), dt, True))
    return out


def synthetic_delta(w: torch.Tensor, gen: torch.Generator, q_max: int = 256) -> torch.Tensor:
    """A fine-tune-like ΔW for ``w`` (any ≥2-D shape): decaying rank-q part plus dense noise."""
    m, n = w.shape[0], w[0].numel()
    q = min(m, n, q_max)
    dev = w.device
    a = torch.randn(m, q, generator=gen, device=dev) / math.sqrt(m)
    b = torch.randn(q, n, generator=gen, device=dev) / math.sqrt(n)
    s = torch.arange(1, q + 1, device=dev, dtype=torch.float32) ** -0.8
    low = (a * s) @ b
    wn = float(w.float().norm())
    low *= 0.03 * wn / float(low.norm())
    noise = torch.randn(m, n, generator=gen, device=dev)
    noise *= 0.005 * wn / float(noise.norm())
    return (low + noise).reshape(w.shape)


def _header(table) -> bytes:
    header, offset = {}, 0
    for key, shape, dtype, _ in table:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_files(table, paths: tuple[Path, Path], gen: torch.Generator, device: str) -> None:
    head = _header(table)
    with open(paths[0], "wb") as fb, open(paths[1], "wb") as ft:
        fb.write(head)
        ft.write(head)
        for _key, shape, dtype, changed in table:
            if not dtype.is_floating_point:
                zeros = torch.zeros(shape, dtype=dtype).numpy().tobytes()
                fb.write(zeros)
                ft.write(zeros)
                continue
            w = torch.randn(shape, generator=gen, device=device) * 0.02
            base = w.to(dtype)
            tuned = (w + synthetic_delta(w, gen)).to(dtype) if changed else base
            for fh, t in ((fb, base), (ft, tuned)):
                fh.write(memoryview(t.cpu().reshape(-1).view(torch.uint8).numpy()))


def write_pair(layout: str, folder: Path, keyshapes: Path, device: str, seed: int = 0,
               layers: int | None = None) -> tuple[Path, Path]:
    """Write the pair (files, or HF folders for an LLM) under ``folder`` and return (base, tuned)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if not is_llm(layout):
        table = checkpoint_table(layout, keyshapes)
        paths = folder / f"{layout}_base.safetensors", folder / f"{layout}_tuned.safetensors"
        _write_files(table, paths, gen, device)
        return paths
    config = {k: v for k, v in llm_config(layout, layers).items() if k not in ("shards", "bias")}
    table = llm_table(layout, layers)
    shards = LLMS[layout]["shards"]
    out = folder / f"{layout}_base", folder / f"{layout}_tuned"
    for d in out:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=1))
    if shards == 1:
        _write_files(table, (out[0] / "model.safetensors", out[1] / "model.safetensors"), gen, device)
        return out
    per = -(-len(table) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = table[s * per:(s + 1) * per]
        _write_files(part, (out[0] / name, out[1] / name), gen, device)
        weight_map.update({k: name for k, *_ in part})
    for d in out:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def nbytes(path: Path) -> int:
    """Bytes of a file, or of the safetensors files in a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))
