"""The exported files load with diffusers' own loaders and reproduce the trained model's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratool.formats.write import write_adapter
from loratool.train.config import TrainConfig
from loratool.train.export import adapter_from_layers, write_outputs
from loratool.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "fixtures" / "tiny-sd"
INSTANCE = REPO / "fixtures" / "tiny-instance"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    cfg = TrainConfig(model=str(MODEL), instance_data=str(INSTANCE), instance_prompt="a <sks> shape", output=str(out),
                      adapter="trilora", rank=4, steps=1, resolution=16, targets=("unet", "text_encoder", "vae"),
                      new_tokens=("<sks>",), init_token="shape")
    tr = Trainer(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a clearly non-zero update in every factor
        for layer in tr.layers.values():
            for p in layer.factors().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    files = write_outputs(tr, {"steps": 1}, 0.0)
    return tr, files


def _unet_out(unet, states):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    return unet(x, torch.tensor([10, 500]), states).sample


def _load(path: Path, fmt_file: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path)).to(dtype=torch.float32)
    base_states = pipe.text_encoder(pipe.tokenizer(["a shape"] * 2, padding="max_length", max_length=16,
                                                   return_tensors="pt").input_ids)[0]
    before = _unet_out(pipe.unet, base_states)
    pipe.load_lora_weights(str(fmt_file.parent), weight_name=fmt_file.name)
    return pipe, before


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_saved_lora_loads_in_diffusers_and_matches(trained, fmt, tmp_path):
    tr, files = trained
    path = Path(files["adapter"]) if fmt == "kohya" else tmp_path / "d.safetensors"
    if fmt != "kohya":
        write_adapter(adapter_from_layers(tr.layers, tr.base.base_model, "bc"), path, fmt)
    pipe, before = _load(MODEL, path)
    ids = pipe.tokenizer(["a shape"] * 2, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        ours_states = tr.base.text_encoders[0](ids)[0]
        theirs_states = pipe.text_encoder(ids)[0]
        assert torch.allclose(theirs_states, ours_states, atol=1e-4)  # text-encoder LoRA applied the same
        ours = _unet_out(tr.base.unet, ours_states)
        theirs = _unet_out(pipe.unet, theirs_states)
    assert (theirs - before).abs().max() > 1e-2  # the LoRA changes the UNet output ...
    assert torch.allclose(theirs, ours, atol=1e-4)  # ... exactly as the trained layers do


def test_new_token_embedding_loads_as_textual_inversion(trained):
    tr, files = trained
    emb = Path(files["embedding <sks>"])
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL)).to(dtype=torch.float32)
    pipe.load_textual_inversion(str(emb), token="<sks>")
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<sks>")]
    assert torch.allclose(row, tr.new_embeddings()[0].detach(), atol=1e-6)


def test_vae_decoder_adapter_is_written_beside_with_its_exact_delta(trained):
    from loratool.io.safetensors import SafetensorsFile

    tr, files = trained
    f = SafetensorsFile(files["vae_adapter"])
    vae_layers = {k: v for k, v in tr.layers.items() if k.startswith("vae.decoder.")}
    assert vae_layers and any(layer.is_conv for layer in vae_layers.values())
    for key, layer in vae_layers.items():
        down, up = f.get(f"{key}.lora_down").double(), f.get(f"{key}.lora_up").double()
        alpha = float(f.get(f"{key}.alpha"))
        delta = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
        assert torch.allclose(delta, layer.delta().flatten(1), atol=1e-6), key


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_locon_unet_adapter_loads_in_diffusers_and_matches(tmp_path, fmt):
    """--targets all (every Linear and Conv2d: ResNet, sampler, transformer, conv_in/conv_out, time embedding)
    exports as a LoCon file that diffusers applies module for module."""
    cfg = TrainConfig(model=str(MODEL), instance_data=str(INSTANCE), instance_prompt="a sks shape",
                      output=str(tmp_path / "o"), rank=4, steps=1, resolution=16, unet_layers="all")
    tr = Trainer(cfg, torch.device("cpu"))
    assert any(layer.is_conv and layer.base.kernel_size == (3, 3) for layer in tr.layers.values())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in tr.layers.values():
            for p in layer.factors().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / f"locon_{fmt}.safetensors"
    write_adapter(adapter_from_layers(tr.layers, tr.base.base_model), path, fmt)
    pipe, before = _load(MODEL, path)
    ids = pipe.tokenizer(["a shape"] * 2, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        ours, theirs = _unet_out(tr.base.unet, states), _unet_out(pipe.unet, states)
    assert (theirs - before).abs().max() > 1e-2
    assert torch.allclose(theirs, ours, atol=1e-4)
