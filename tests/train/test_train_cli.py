"""`loratool train`: bad input gives one clear line; a real run writes loadable, hashed, described files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import one_error
from click.testing import CliRunner
from PIL import Image

from loratool.cli.main import cli
from loratool.io.hashes import check_hash
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors
from loratool.train.checkpoint import FORMAT

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "fixtures" / "tiny-sd"
INSTANCE = REPO / "fixtures" / "tiny-instance"


def train(*args: str):
    base = ["train", "--model", str(MODEL), "--instance-prompt", "a sks shape", "--resolution", "16", "-r", "4"]
    return CliRunner().invoke(cli, [*base, *args])


def _folder(tmp_path: Path, name: str, images: dict[str, Image.Image | bytes]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for fname, im in images.items():
        if isinstance(im, bytes):
            (folder / fname).write_bytes(im)
        else:
            im.save(folder / fname)
    return folder


def test_bad_inputs_are_one_line_errors(tmp_path):
    empty = _folder(tmp_path, "empty", {})
    one_error(train("--instance-data", str(empty), "-o", str(tmp_path / "o")), "holds no images", "empty")
    garbage = _folder(tmp_path, "garbage", {"x.png": b"not an image at all"})
    one_error(train("--instance-data", str(garbage), "-o", str(tmp_path / "o")), "not a readable image", "x.png")
    cmyk = _folder(tmp_path, "cmyk", {"c.jpg": Image.new("CMYK", (32, 32))})
    one_error(train("--instance-data", str(cmyk), "-o", str(tmp_path / "o")), "mode CMYK", "c.jpg")
    small = _folder(tmp_path, "small", {"s.png": Image.new("RGB", (8, 8))})
    one_error(train("--instance-data", str(small), "-o", str(tmp_path / "o")), "8x8, smaller than --resolution 16")
    one_error(train("--instance-data", str(tmp_path / "nope"), "-o", str(tmp_path / "o")), "does not exist")
    res = CliRunner().invoke(cli, ["train", "--model", str(tmp_path / "missing"), "--instance-data", str(INSTANCE),
                                   "--instance-prompt", "a sks shape", "-o", str(tmp_path / "o")])
    one_error(res, "model path does not exist", "missing")
    one_error(train("--instance-data", str(INSTANCE), "--resolution", "12", "-o", str(tmp_path / "o")),
              "--resolution 12 is not a positive multiple of 8")
    one_error(train("--instance-data", str(INSTANCE), "--class-prompt", "a shape", "-o", str(tmp_path / "o")),
              "needs both --class-data and --class-prompt")
    one_error(train("--instance-data", str(INSTANCE), "--compile", "--recompute-pointwise", "-o", str(tmp_path / "o")),
              "--compile and --recompute-pointwise do not combine")


def test_resume_from_another_adapter_type_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    meta = {"loratool.format": FORMAT, "loratool.adapter": "lora", "loratool.rank": "4", "loratool.alpha": "4.0",
            "loratool.trilora_init": "", "loratool.targets": '["unet"]', "loratool.new_tokens": "[]"}
    write_safetensors(ckpt / "adapter.safetensors", {"x": torch.zeros(1)}, meta)
    res = train("--instance-data", str(INSTANCE), "--adapter", "trilora", "--resume", str(ckpt), "-o", str(tmp_path / "o"))
    one_error(res, "--resume", "adapter is lora, but this run asks for trilora")
    ckpt2 = tmp_path / "ckpt2"
    ckpt2.mkdir()
    write_safetensors(ckpt2 / "adapter.safetensors", {"x": torch.zeros(1)},
                      {**meta, "loratool.adapter": "trilora", "loratool.trilora_init": "svd",
                       "loratool.unet_layers": "attn"})
    res = train("--instance-data", str(INSTANCE), "--adapter", "trilora", "--unet-layers", "all", "--resume", str(ckpt2),
                "-o", str(tmp_path / "o"))
    # the old --unet-layers all is the LoCon set, transformer+conv in the one --targets vocabulary
    one_error(res, "--resume", "unet_layers is attn, but this run asks for transformer+conv")


@pytest.mark.slow
def test_cli_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    res = train("--instance-data", str(INSTANCE), "--adapter", "trilora", "--targets", "unet,text_encoder",
                "--steps", "2", "--lr", "1e-3", "--snr-gamma", "5", "--save-every", "1",
                "--sample-prompt", "a sks shape", "--sample-every", "2", "--sample-steps", "3", "--device", "cpu", "--json", "-o", str(out))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["steps"] == 2 and summary["adapter"] == "trilora"
    lora = Path(summary["files"]["adapter"])
    assert check_hash(lora) is True
    meta = SafetensorsFile(lora).metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_max_train_steps"] == "2" and meta["ss_min_snr_gamma"] == "5.0"
    assert json.loads(meta["ss_network_args"])["algo"] == "trilora"
    assert meta["modelspec.architecture"].endswith("/lora")
    keys = list(SafetensorsFile(lora).keys())
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert (out / "samples" / "step_000002.png").is_file() and (out / "loss.png").is_file()
    assert (out / "checkpoint-000001" / "state.pt").is_file() and (out / "checkpoint-final" / "adapter.safetensors").is_file()


def test_the_readme_example_trains_at_the_models_own_resolution(tmp_path):
    """No --resolution: the UNet's sample size times the VAE's scale (32 for tiny-sd, 512 for SD1.5)."""
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--model", str(MODEL), "--instance-data", str(INSTANCE),
                                   "--instance-prompt", "a photo of sks", "--steps", "1", "--device", "cpu",
                                   "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    meta = SafetensorsFile(Path(summary["files"]["adapter"])).metadata
    assert meta["ss_resolution"] == "(32, 32)" and meta["modelspec.resolution"] == "32x32"
    too_big = CliRunner().invoke(cli, ["train", "--model", str(MODEL), "--instance-data", str(INSTANCE),
                                       "--instance-prompt", "a photo of sks", "--resolution", "64", "--steps", "1",
                                       "--device", "cpu", "-o", str(tmp_path / "big")])
    one_error(too_big, "sks_0.png", "smaller than --resolution 64")


def test_quiet_prints_nothing_at_all(tmp_path):
    """-q promises errors only: the libraries' own notes (weights loaded, embeddings resized, torchvision
    missing) and loading bars must not leak onto stderr, in a real process with real stream handlers."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "loratool", "train", "--model", str(MODEL), "--instance-data", str(INSTANCE),
           "--instance-prompt", "a <sks> shape", "--new-tokens", "<sks>", "--init-token", "cross",
           "--targets", "unet,text_encoder", "--steps", "1", "--resolution", "16", "--device", "cpu", "-q",
           "-o", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)
    assert (tmp_path / "run" / "lora.safetensors").is_file()
