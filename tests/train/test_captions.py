"""Sidecar captions (--caption-extension): per-image prompts in batches, kohya's tag counts, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_checks import one_error
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.errors import LoraToolError
from loratool.io.safetensors import SafetensorsFile
from loratool.train.config import TrainConfig
from loratool.train.data import Examples, load_captioned, read_caption

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "fixtures" / "tiny-sd"
INSTANCE = REPO / "fixtures" / "tiny-instance"


def _captioned(tmp_path: Path, captions: dict[str, str | bytes]) -> Path:
    folder = tmp_path / "inst"
    shutil.copytree(INSTANCE, folder)
    for stem, text in captions.items():
        path = folder / f"{stem}.txt"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


def test_sidecar_captions_replace_the_prompt_image_by_image(tmp_path):
    folder = _captioned(tmp_path, {"sks_1": "a sks shape, on the right\n", "sks_3": "  a sks shape,\tat the bottom "})
    pixels, prompts = load_captioned(folder, 32, "instance image folder", "a sks shape", ".txt")
    assert len(pixels) == 5
    assert prompts == ["a sks shape", "a sks shape, on the right", "a sks shape", "a sks shape, at the bottom",
                       "a sks shape"]
    assert load_captioned(folder, 32, "x", "p", None)[1] == ["p"] * 5  # no extension: sidecars are ignored


def test_batches_pair_each_image_with_its_own_caption():
    inst = torch.arange(6).float().view(6, 1, 1, 1).expand(6, 3, 2, 2)
    klass = 100 + torch.arange(4).float().view(4, 1, 1, 1).expand(4, 3, 2, 2)
    ex = Examples(inst, [f"inst {i}" for i in range(6)], klass, [f"class {i}" for i in range(4)])
    pixels, prompts, n = ex.batch(8, torch.Generator().manual_seed(3))
    assert n == 8 and len(prompts) == 16
    for img, prompt in zip(pixels, prompts, strict=True):
        value = int(img[0, 0, 0])
        assert prompt == (f"inst {value}" if value < 100 else f"class {value - 100}")
    assert ex.prompt_counts("class") == {f"class {i}": 1 for i in range(4)}
    assert Examples(inst, "one").prompt_counts("instance") == {"one": 6} and Examples(inst, "one").prompt_counts("class") == {}


@pytest.mark.parametrize(("content", "message"), [(b"", "caption file is empty"), (b"  \n", "caption file is empty"),
                                                  (b"\xff\xfe\x00bad", "not UTF-8")])
def test_bad_caption_files_are_named(tmp_path, content, message):
    image = tmp_path / "a.png"
    (tmp_path / "a.txt").write_bytes(content)
    with pytest.raises(LoraToolError, match=message) as e:
        read_caption(image, ".txt")
    assert "a.txt" in str(e.value)
    assert read_caption(tmp_path / "b.png", ".txt") is None


def test_caption_extension_is_checked_and_normalised():
    cfg = TrainConfig(model=str(MODEL), instance_data="x", instance_prompt="a", output="o", caption_extension="txt")
    cfg.check()
    assert cfg.caption_extension == ".txt"
    for bad in (".", ".png", "a/b"):
        with pytest.raises(LoraToolError, match="--caption-extension"):
            TrainConfig(model=str(MODEL), instance_data="x", instance_prompt="a", output="o",
                        caption_extension=bad).check()


def _train(*args: str):
    base = ["train", "--model", str(MODEL), "--instance-prompt", "a sks shape", "--resolution", "16", "-r", "2",
            "--steps", "1", "--device", "cpu", "--quiet"]
    return CliRunner().invoke(cli, [*base, *args])


def test_cli_trains_on_captions_and_records_kohya_tag_frequency(tmp_path):
    folder = _captioned(tmp_path, {"sks_0": "a sks shape, in the center", "sks_4": "a sks shape, at the top right"})
    res = _train("--instance-data", str(folder), "--caption-extension", ".txt", "-o", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    meta = SafetensorsFile(tmp_path / "o" / "lora.safetensors").metadata
    assert json.loads(meta["ss_tag_frequency"]) == {"inst": {"a sks shape": 5, "in the center": 1,
                                                             "at the top right": 1}}
    (folder / "sks_2.txt").write_bytes(b"")
    one_error(_train("--instance-data", str(folder), "--caption-extension", "txt", "-o", str(tmp_path / "o2")),
              "caption file is empty", "sks_2.txt")
    assert not (tmp_path / "o2" / "lora.safetensors").exists()
