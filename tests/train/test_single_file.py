"""Single-file SD1/SD2/SDXL checkpoints for `train`: every key of the real layouts maps into models built
from our shipped configs (on the meta device: no weights allocated), loading is strict, and the CLI gives
one clear line for a missing tokenizer or a file that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import one_error
from click.testing import CliRunner

from loratool.arch import detect_arch_from_checkpoint, load_arch
from loratool.cli.main import cli
from loratool.errors import LoraToolError
from loratool.io.writer import write_safetensors
from loratool.train import single_file
from loratool.train.single_file import (
    build_models,
    clip_tokenizer_from_bpe,
    fill_models,
    load_tokenizers,
    map_checkpoint,
    open_clip_bpe_file,
    shipped_configs,
)

REPO = Path(__file__).resolve().parents[2]
INSTANCE = REPO / "fixtures" / "tiny-instance"
TOKENIZER = REPO / "fixtures" / "tiny-sd" / "tokenizer"
REAL_LAYOUTS = {"sd1": "sd15_ldm_checkpoint_full.json", "sdxl": "sdxl_sgm_checkpoint_full.json"}


def _real_keys(real_dir: Path, arch: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((real_dir / "keyshapes" / REAL_LAYOUTS[arch]).read_text())
    return {k: tuple(v["shape"]) for k, v in data.items()}


def _table_keys(arch: str) -> dict[str, tuple[int, ...]]:
    table = load_arch(arch)
    return {k: table.checkpoint_shape(k) for k in table.checkpoint_params}


def _meta(keys: dict[str, tuple[int, ...]]):
    return lambda k: torch.empty(keys[k], device="meta")


def _fill(arch: str, keys: dict[str, tuple[int, ...]]) -> dict[str, torch.nn.Module]:
    models = build_models(arch, shipped_configs(arch))
    fill_models(models, map_checkpoint(arch, keys, _meta(keys)))
    return models


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_real_single_file_layout_fills_every_parameter(real_dir, arch):
    keys = _real_keys(real_dir, arch)
    assert detect_arch_from_checkpoint(keys.items()) == arch
    models = _fill(arch, keys)  # strict: raises on any missing/unexpected tensor or wrong shape
    table = load_arch(arch)
    used = [k for k in keys if k in table.checkpoint_params]
    skipped = [k for k in keys if k not in table.checkpoint_params]
    assert all(table.is_checkpoint_extra(k) for k in skipped)
    n_file = sum(torch.Size(keys[k]).numel() for k in used)
    n_model = sum(p.numel() for m in models.values() for p in m.parameters())
    assert n_model == n_file  # every stored number lands in exactly one parameter (fused rows split)
    assert set(models) == {"unet", "vae", "text_encoder"} | ({"text_encoder_2"} if arch == "sdxl" else set())


def test_sd2_layout_from_the_table_fills_every_parameter():
    keys = _table_keys("sd2")
    assert detect_arch_from_checkpoint(keys.items()) == "sd2"
    models = _fill("sd2", keys)
    assert models["text_encoder"].config.num_hidden_layers == 23
    assert models["unet"].config.cross_attention_dim == 1024


def test_missing_unknown_and_misshapen_tensors_are_named(real_dir):
    keys = _real_keys(real_dir, "sd1")
    gone = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    less = {k: v for k, v in keys.items() if k != gone}
    with pytest.raises(LoraToolError, match=r"unet lacks down_blocks\.0\.attentions\.0\.proj_in\.weight"):
        _fill("sd1", less)
    more = {**keys, "model.diffusion_model.bogus.weight": (3,)}
    with pytest.raises(LoraToolError, match="model.diffusion_model.bogus.weight"):
        map_checkpoint("sd1", more, _meta(more))
    bad = {**keys, "first_stage_model.decoder.conv_in.weight": (512, 4, 1, 1)}
    with pytest.raises(LoraToolError, match=r"first_stage_model\.decoder\.conv_in\.weight has shape"):
        map_checkpoint("sd1", bad, _meta(bad))


def test_values_land_in_the_right_vae_parameters():
    """Each file tensor is filled with its own index: every VAE parameter must hold its key's index
    (checks the LDM->diffusers names and the 1x1-conv attention squeeze on real data, ~80M numbers)."""
    keys = {k: s for k, s in _table_keys("sd1").items() if k.startswith("first_stage_model.")}
    index = {k: i for i, k in enumerate(sorted(keys))}
    tensors = map_checkpoint("sd1", keys, lambda k: torch.tensor(float(index[k])).expand(keys[k]))
    vae = build_models("sd1", shipped_configs("sd1"))["vae"]
    fill_models({"vae": vae}, tensors)
    table = load_arch("sd1").diffusers_param_map("vae")
    for name, p in vae.state_dict().items():
        want = index[table[("vae", name)].checkpoint_key]
        assert p.dtype == torch.float32 and not p.is_meta
        assert p.min() == p.max() == want, name
    assert vae.decoder.mid_block.attentions[0].to_q.weight.shape == (512, 512)


def _train(*args: str):
    base = ["train", "--instance-data", str(INSTANCE), "--instance-prompt", "a sks shape", "--resolution", "32",
            "-o", "out"]
    return CliRunner().invoke(cli, [*base, *args])


def test_clip_tokenizer_from_open_clip_bpe(tmp_path):
    bpe = open_clip_bpe_file()
    if bpe is None:
        pytest.skip("open_clip_torch is not installed (its BPE list is the optional tokenizer source)")
    tok = clip_tokenizer_from_bpe(bpe)
    assert len(tok) == 49408
    # CLIP's published ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A PHOTO").input_ids == tok("a photo").input_ids
    one, two = load_tokenizers("sdxl", None, tmp_path / "x.safetensors")
    ids = two(["a cat"], padding="max_length", max_length=77).input_ids[0]
    # SDXL's second tokenizer pads with "!" (id 0), the first with <|endoftext|>
    assert len(ids) == 77 and ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * 73
    assert one(["a cat"], padding="max_length", max_length=77).input_ids[0][4:] == [49407] * 73


def test_cli_single_file_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(single_file, "open_clip_bpe_file", lambda: None)
    part = tmp_path / "part.safetensors"  # SD1 keys with real shapes, but only two of them
    write_safetensors(part, {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, {})
    one_error(_train("--model", str(part)), "part.safetensors", "--tokenizer DIR", "open_clip_torch")
    one_error(_train("--model", str(part), "--tokenizer", str(TOKENIZER)), "part.safetensors",
               "does not fit the unet config", "unet lacks")
    other = tmp_path / "other.safetensors"
    write_safetensors(other, {"foo.weight": torch.zeros(2, 2)}, {})
    one_error(_train("--model", str(other), "--tokenizer", str(TOKENIZER)), "not an SD1.x/SD2.x/SDXL checkpoint")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    one_error(_train("--model", str(ckpt), "--tokenizer", str(TOKENIZER)), "must be .safetensors")
    folder = REPO / "fixtures" / "tiny-sd"
    one_error(_train("--model", str(folder), "--tokenizer", str(TOKENIZER)), "are for single-file checkpoints")


@pytest.mark.parametrize("arch,size", [("sd1", 512), ("sd2", 768), ("sdxl", 1024)])
def test_native_resolution_of_the_shipped_configs(arch, size):
    """The --resolution default: SD1.5 512, SD2 768-v 768, SDXL 1024 (models on the meta device)."""
    from loratool.train.model import BaseModel

    models = single_file.build_models(arch, single_file.shipped_configs(arch))
    assert BaseModel.native_resolution.fget(type("M", (), {"unet": models["unet"], "vae": models["vae"]})) == size
