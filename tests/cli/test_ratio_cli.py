"""`loratool ratio` through CliRunner: shape, model and file modes against hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.io.writer import write_safetensors


def run(*args: str):
    return CliRunner().invoke(cli, ["ratio", *args])


def test_shape_table_json_by_hand():
    res = run("--shape", "1280x1280", "-r", "8", "16", "32", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    # d·k = 1 638 400; r(d+k) = 2560 r; ratio 640 / r
    assert [(r["rank"], r["full_params"], r["lora_params"], r["ratio"]) for r in rows] == [
        (8, 1_638_400, 20_480, 80.0), (16, 1_638_400, 40_960, 40.0), (32, 1_638_400, 81_920, 20.0)]


def test_shape_table_text_and_rank_spellings():
    for args in (["-r", "8", "16"], ["-r", "8,16"], ["-r", "8", "-r", "16"]):
        res = run("--shape", "1280x1280", *args)
        assert res.exit_code == 0, res.output
        assert "1,638,400" in res.stdout and "20,480" in res.stdout and "80×" in res.stdout and "40×" in res.stdout


def test_conv_shape():
    # 3x3 conv 320->640: d = 640, k = 2880; full 1 843 200; r=16: 16·3520 = 56 320; 32.727…
    rows = json.loads(run("--shape", "640x320x3x3", "-r", "16", "--json").stdout)["rows"]
    assert (rows[0]["d"], rows[0]["k"], rows[0]["full_params"], rows[0]["lora_params"]) == (640, 2880, 1_843_200, 56_320)
    assert rows[0]["ratio"] == pytest.approx(1_843_200 / 56_320)


def test_square_tenth_rank_is_five():
    rows = json.loads(run("--shape", "1280x1280", "-r", "128", "--json").stdout)["rows"]
    assert rows[0]["ratio"] == 5.0


def test_sd15_model_table_by_hand():
    res = run("--model", "sd15", "--targets", "transformer", "-r", "4", "8", "16", "32", "64", "128", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["model"] == "sd1" and out["layers"] == 264
    assert out["layers_by_component"] == {"unet": 192, "text_encoder": 72}  # kohya's counts (reference §1.5)
    # Σ (d+k) of SD1.5's default kohya targets, worked out in tests/unit/test_ratio.py: 589 824
    assert [r["lora_params"] for r in out["rows"]] == [r * 589_824 for r in (4, 8, 16, 32, 64, 128)]
    # fp16 file data: (128·589 824 + 264 alphas)·2 bytes = 144.0005 MiB (seeds/002 says 163 MiB)
    assert out["rows"][-1]["fp16_mib"] == pytest.approx((128 * 589_824 + 264) * 2 / 2**20)
    assert out["rows"][0]["fp16_mib"] == pytest.approx((4 * 589_824 + 264) * 2 / 2**20)
    # seeds/002: UNet 860M, text encoder 123M, VAE 84M parameters
    mp = out["model_params"]
    assert mp["trainable"] == pytest.approx(860e6 + 123e6, rel=0.005)
    assert mp["frozen"] == pytest.approx(84e6, rel=0.005)
    # memory: full fp32 = trainable·16 + frozen·4; LoRA fp32 = (trainable+frozen)·4 + L·16
    mem = out["rows"][-1]["memory_bytes"]
    lora = 128 * 589_824
    assert mem["fp32"]["full"]["total"] == mp["trainable"] * 16 + mp["frozen"] * 4
    assert mem["fp32"]["lora"]["total"] == (mp["trainable"] + mp["frozen"]) * 4 + lora * 16
    assert mem["fp16-mixed"]["full"]["total"] == mp["trainable"] * 12 + mp["frozen"] * 2
    assert mem["fp16-mixed"]["lora"]["total"] == (mp["trainable"] + mp["frozen"]) * 2 + lora * 12


def test_sdxl_and_flux_layer_counts():
    sdxl = json.loads(run("--model", "sdxl", "--targets", "transformer", "-r", "32", "--json").stdout)
    # kohya: SDXL text encoders 72 + 192, U-Net transformer blocks 722 (reference/kohya.md §1.5)
    assert sdxl["layers_by_component"] == {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}
    assert sdxl["targets"] == "transformer" == json.loads(run("--model", "sdxl", "-r", "8", "--json").stdout)["targets"]
    # attention projections only: q, k, v, out of 70 UNet transformer blocks x 2 attentions, 12 + 32 CLIP layers
    attn = json.loads(run("--model", "sdxl", "--targets", "attn", "-r", "32", "--json").stdout)
    assert attn["layers_by_component"] == {"unet": 70 * 2 * 4, "text_encoder": 12 * 4, "text_encoder_2": 32 * 4}
    conv = json.loads(run("--model", "sdxl", "--targets", "attn+conv", "-r", "32", "--json").stdout)
    assert conv["layers_by_component"]["unet"] == 788 and conv["targets"] == "transformer+conv"  # the old name
    flux = json.loads(run("--model", "flux", "-r", "16", "--json").stdout)
    assert flux["layers_by_component"]["transformer"] == 304  # 19·10 + 38·3


def test_model_text_mentions_what_memory_counts():
    res = run("--model", "sd15", "-r", "8")
    assert res.exit_code == 0
    assert "weights + gradients + Adam states only" in res.stdout and "fp16 MiB" in res.stdout
    help_text = " ".join(run("--help").stdout.split())
    assert "no activations" in help_text and "fp16-mixed weight 2, gradient 2, Adam 4+4" in help_text


def _kohya_file(path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    t = {}
    for key, (out, inp), r in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (320, 320), 8),
                               ("lora_te_text_model_encoder_layers_0_mlp_fc1", (3072, 768), 4)):
        t[f"{key}.lora_down.weight"] = torch.randn(r, inp, generator=g).half()
        t[f"{key}.lora_up.weight"] = torch.randn(out, r, generator=g).half()
        t[f"{key}.alpha"] = torch.tensor(float(r)).half()
    write_safetensors(path, t, {})
    return path


def test_file_mode_by_hand(tmp_path):
    f = _kohya_file(tmp_path / "k.safetensors")
    out = json.loads(run(str(f), "--json").stdout)
    # unet: 320·320 = 102 400 over 8·640 = 5 120 -> 20; text encoder: 3072·768 = 2 359 296 over 4·3840 = 15 360
    assert out["components"]["unet"] == {"modules": 1, "full_params": 102_400, "adapter_params": 5_120, "ratio": 20.0}
    te = out["components"]["text_encoder"]
    assert (te["full_params"], te["adapter_params"], te["ratio"]) == (2_359_296, 15_360, 153.6)
    assert out["total"]["ratio"] == pytest.approx((102_400 + 2_359_296) / (5_120 + 15_360))
    # the same layers at rank 16: 16·640 + 16·3840 = 71 680
    out = json.loads(run(str(f), "-r", "16", "--json").stdout)
    assert out["rows"] == [{"rank": 16, "layers": 2, "full_params": 2_461_696, "lora_params": 71_680,
                            "ratio": 2_461_696 / 71_680}]
    text = run(str(f)).stdout
    assert "total" in text and "154×" in text and "20×" in text


def test_usage_errors_exit_2(tmp_path):
    assert run().exit_code == 2
    assert run("--shape", "12x", "-r", "4").exit_code == 2
    assert run("--shape", "8x8", "--model", "sd15").exit_code == 2
    assert run("--shape", "8x8", "-r", "0").exit_code == 2


def test_empty_file_is_refused_in_one_line(tmp_path):
    f = tmp_path / "empty.safetensors"
    write_safetensors(f, {}, {})
    res = run(str(f))
    assert res.exit_code == 1
    assert res.stderr.strip().startswith(f"loratool: error: {f}: ") and len(res.stderr.strip().splitlines()) == 1


def test_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    png = tmp_path / "r.png"
    assert run("--model", "sd15", "--plot", str(png)).exit_code == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("model,components,rank,keyshapes", [
    ("sdxl", "default", 32, "sdxl_kohya_lora_r32.json"),  # 986 modules: 722 U-Net + 72 + 192 TE
    ("flux", "transformer", 16, "flux_kohya_lora_r16.json"),  # 304 transformer modules
    ("sd15", "default", 128, "sd15_kohya_lora_r128.json"),
])
def test_model_table_equals_real_kohya_files(real_dir, model, components, rank, keyshapes):
    shapes = json.loads((real_dir / "keyshapes" / keyshapes).read_text())
    factors = [v["shape"] for k, v in shapes.items() if k.endswith(("lora_down.weight", "lora_up.weight"))]
    stored = sum(torch.Size(s).numel() for s in factors)
    out = json.loads(run("--model", model, "--components", components, "-r", str(rank), "--json").stdout)
    assert out["layers"] == len(factors) // 2
    assert out["rows"][0]["lora_params"] == stored


def test_components_default_leaves_t5_out():
    flux = json.loads(run("--model", "flux", "-r", "16", "--json").stdout)
    assert flux["components"] == ["transformer", "text_encoder"]
    everything = json.loads(run("--model", "flux", "--components", "all", "-r", "16", "--json").stdout)
    assert everything["layers_by_component"]["text_encoder_2"] == 168  # T5-XXL attention + MLP
    assert run("--model", "flux", "--components", "unet", "-r", "16").exit_code == 2


def test_bad_file_is_refused_in_one_line(tmp_path):
    f = tmp_path / "two.safetensors"
    f.write_bytes(b"\r\n")
    res = run(str(f))
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.strip().startswith(f"loratool: error: {f}: ") and len(res.stderr.strip().splitlines()) == 1
