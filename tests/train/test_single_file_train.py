"""`loratool train --model FILE.safetensors` end to end on a tiny SD1 single file.

The file keeps SD1's block structure exactly (every key of the SD1 LDM layout, nothing else) at tiny widths;
its widths come with ``--config`` (a diffusers folder), its tokenizer with ``--tokenizer``. It is written with
the arch table in the diffusers -> LDM direction (loratool.arch.convert.diffusers_to_checkpoint), trained for
two steps through the CLI, and the LoRA must carry SD1.5's kohya module ids; the models the trainer loads
must hold the file's tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import one_error
from click.testing import CliRunner

from loratool.arch import detect_arch_from_checkpoint, load_arch
from loratool.arch.convert import checkpoint_to_diffusers, diffusers_to_checkpoint
from loratool.arch.detect import detect_layout_from_checkpoint
from loratool.cli.main import cli
from loratool.errors import LoraToolError
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors
from loratool.train.model import load_base
from loratool.train.single_file import checkpoint_arch, shipped_configs

REPO = Path(__file__).resolve().parents[2]
REAL_LAYOUTS = {"sd1": "sd15_ldm_checkpoint_full.json", "sdxl": "sdxl_sgm_checkpoint_full.json"}
INSTANCE = REPO / "fixtures" / "tiny-instance"
TOKENIZER = REPO / "fixtures" / "tiny-sd" / "tokenizer"

# SD1's configs (shipped with loratool) with only the widths made tiny: same blocks, layers and attentions.
TINY = {
    "unet": {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 32,
             "attention_head_dim": 2, "sample_size": 4},
    "vae": {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "sample_size": 32},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32,
                     "vocab_size": 144, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
}


def _tiny_models(cfg_dir: Path) -> dict[str, torch.nn.Module]:
    """Random tiny SD1-structured models; their configs written to ``cfg_dir`` as a diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = shipped_configs("sd1")
    for name, change in TINY.items():
        configs[name] = {**configs[name], **change}
    torch.manual_seed(0)
    models = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
              "vae": AutoencoderKL.from_config(configs["vae"]),
              "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
    with torch.no_grad():  # diffusers zero-initialises some layers (conv_out, proj_out): no value may be 0
        for model in models.values():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
    for name, file in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("scheduler", "scheduler_config.json")):  # --config reads the configs only
        (cfg_dir / name).mkdir(parents=True)
        (cfg_dir / name / file).write_text(json.dumps(configs[name]))
    return models


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's tensors by the table's names (CLIP's keep ``text_model.``, as sd-scripts and the table do)."""
    sd = model.state_dict()
    return {**sd, **{f"text_model.{k}": v for k, v in sd.items() if not k.startswith("text_model.")}}


def _ldm_tensors(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The single-file (LDM) tensors of the models: every checkpoint key of the SD1 table, built from the
    diffusers tensors it holds."""
    table = load_arch("sd1")
    states = {name: _state(m) for name, m in models.items()}
    return {key: diffusers_to_checkpoint(table, key, lambda p: states[p.component][p.name]).contiguous()
            for key in table.checkpoint_params}


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    """(single file, config folder, the diffusers models it was written from)."""
    root = tmp_path_factory.mktemp("tiny-sd1-single-file")
    models = _tiny_models(root / "config")
    file = root / "tiny.safetensors"
    write_safetensors(file, _ldm_tensors(models), {})
    return file, root / "config", models


def test_tiny_sd1_single_file_trains_through_the_cli(tiny_sd1, tmp_path):
    file, cfg, _ = tiny_sd1
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, [
        "train", "--model", str(file), "--config", str(cfg), "--tokenizer", str(TOKENIZER),
        "--instance-data", str(INSTANCE), "--instance-prompt", "a sks shape", "--resolution", "32",
        "--targets", "unet,text_encoder", "-r", "2", "--steps", "2", "--lr", "1e-3", "--device", "cpu",
        "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["steps"] == 2
    lora = SafetensorsFile(summary["files"]["adapter"])
    ids = {k.split(".")[0] for k in lora.keys()}
    table = load_arch("sd1")
    sd15 = {spec.kohya for spec in table.modules.values()}
    assert ids <= sd15, sorted(ids - sd15)[:5]  # every module id is one an SD1.5 kohya LoRA uses
    unet = {i for i in ids if i.startswith("lora_unet_")}
    te = {i for i in ids if i.startswith("lora_te_")}
    assert unet and te and unet | te == ids
    # the whole structure was trained: attention layers of all 16 transformer blocks and all 12 CLIP layers
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k" in unet
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0" in unet
    assert len({i.split("_transformer_blocks")[0] for i in unet}) == 16
    assert len({i.split("_layers_")[1].split("_")[0] for i in te}) == 12
    assert "lora_te_text_model_encoder_layers_11_self_attn_q_proj" in te
    for key in ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                "lora_te_text_model_encoder_layers_11_self_attn_q_proj.lora_up.weight"):
        assert lora.get(key).shape[0 if "down" in key else 1] == 2  # rank 2 at the tiny widths
        assert torch.isfinite(lora.get(key)).all()


def test_the_trainer_loads_the_files_tensors(tiny_sd1):
    file, cfg, source = tiny_sd1
    assert detect_arch_from_checkpoint({k: v.shape for k, v in _ldm_tensors(source).items()}) == "unknown"
    assert checkpoint_arch(file) == "sd1"  # widths of no real model: the SD1 key structure decides
    base = load_base(file, torch.device("cpu"), TOKENIZER, cfg)  # what `train` calls
    assert base.base_model == "sd1" and base.unet.config.cross_attention_dim == 32
    ckpt = SafetensorsFile(file)
    # a few tensors by their real SD1 names (LDM -> diffusers as every SD1 loader maps them)
    unet, vae, te = base.unet, base.vae, base.text_encoders[0]
    pairs = [
        ("model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
         unet.up_blocks[1].attentions[2].transformer_blocks[0].attn2.to_k.weight),
        ("model.diffusion_model.input_blocks.4.0.skip_connection.weight",
         unet.down_blocks[1].resnets[0].conv_shortcut.weight),
        ("model.diffusion_model.out.2.weight", unet.conv_out.weight),
        ("first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
         vae.decoder.up_blocks[2].resnets[0].conv_shortcut.weight),
        ("first_stage_model.encoder.mid.attn_1.q.weight", vae.encoder.mid_block.attentions[0].to_q.weight),
        ("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
         te.encoder.layers[11].mlp.fc2.weight),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
         te.embeddings.token_embedding.weight),
    ]
    for key, param in pairs:
        stored = ckpt.get(key)
        assert torch.equal(stored.reshape(param.shape), param), key
        assert stored.abs().sum() > 0, key
    # and every tensor of every model equals the diffusers model the file was written from
    for name, model in base.components.items():
        want = source[name].state_dict()
        got = model.state_dict()
        assert set(got) == set(want), name
        for k, v in got.items():
            assert v.dtype == torch.float32 and torch.equal(v, want[k]), f"{name}.{k}"


def test_a_missing_tensor_or_no_config_is_one_line(tiny_sd1, tmp_path):
    file, cfg, _ = tiny_sd1
    ckpt = SafetensorsFile(file)
    gone = "first_stage_model.decoder.mid.attn_1.proj_out.weight"
    part = tmp_path / "part.safetensors"
    write_safetensors(part, {k: ckpt.get(k) for k in ckpt.keys() if k != gone}, {})

    def train(model: Path, *extra: str):
        return CliRunner().invoke(cli, [
            "train", "--model", str(model), "--tokenizer", str(TOKENIZER), "--instance-data", str(INSTANCE),
            "--instance-prompt", "a sks shape", "--resolution", "32", "--steps", "1", "--device", "cpu",
            "-o", str(tmp_path / "o"), *extra])

    one_error(train(part, "--config", str(cfg)), "part.safetensors", "does not fit the vae config",
              "vae lacks decoder.mid_block.attentions.0.to_out.0.weight")
    one_error(train(file), file.name, "has shape", "sd1 expects", "--config")  # no --config: SD1.5 widths
    bad = tmp_path / "bad.safetensors"  # a 1x1 attention conv stored as a 3x3
    write_safetensors(bad, {**{k: ckpt.get(k) for k in ckpt.keys()}, gone: torch.zeros(32, 32, 3, 3)}, {})
    one_error(train(bad, "--config", str(cfg)), "bad.safetensors", gone, "ending in 1x1")


def test_layout_by_key_names_alone(real_dir):
    """The width-free fallback names the real layouts too, and refuses what no one table explains."""
    for arch, name in REAL_LAYOUTS.items():
        keys = list(json.loads((real_dir / "keyshapes" / name).read_text()))
        assert detect_layout_from_checkpoint(keys) == arch
        gone = next(k for k in keys if k in load_arch(arch).checkpoint_params)
        assert detect_layout_from_checkpoint([k for k in keys if k != gone]) == arch  # one short: still its layout
        assert detect_layout_from_checkpoint([*keys, "model.diffusion_model.bogus.weight"]) == "unknown"
        if arch == "sdxl":  # the refiner's layout (OpenCLIP-G alone, as embedders.0) is no table's
            refiner = [k.replace("embedders.1.", "embedders.0.") for k in keys if "embedders.0." not in k]
            assert detect_layout_from_checkpoint(refiner) == "unknown"
    for other in ("flux_bfl_checkpoint_full.json", "sd3_comfyui_checkpoint_full.json"):
        assert detect_layout_from_checkpoint(json.loads((real_dir / "keyshapes" / other).read_text())) == "unknown"
    assert detect_layout_from_checkpoint(load_arch("sd2").checkpoint_params) == "sd2"
    unet_only = [k for k in load_arch("sd1").checkpoint_params if k.startswith("model.diffusion_model.")]
    assert detect_layout_from_checkpoint(unet_only) == "unknown"  # SD1 and SD2 share these names
    assert detect_layout_from_checkpoint([]) == "unknown"


def test_fused_rows_scale_to_the_files_width():
    """SD2's OpenCLIP in_proj at a tiny width: q, k, v are its thirds, as at the real width."""
    table = load_arch("sd2")
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    fused = torch.arange(24 * 8.0).reshape(24, 8)
    with pytest.raises(LoraToolError, match="sd2 expects"):
        checkpoint_to_diffusers(table, key, fused)
    parts = {p.name.split(".")[-2]: t for p, t in checkpoint_to_diffusers(table, key, fused, table_shapes=False)}
    assert torch.equal(parts["q_proj"], fused[:8]) and torch.equal(parts["k_proj"], fused[8:16])
    assert torch.equal(parts["v_proj"], fused[16:])
    with pytest.raises(LoraToolError, match="do not split"):
        checkpoint_to_diffusers(table, key, torch.zeros(25, 8), table_shapes=False)
    with pytest.raises(LoraToolError, match="2 dims"):
        checkpoint_to_diffusers(table, key, torch.zeros(24), table_shapes=False)
