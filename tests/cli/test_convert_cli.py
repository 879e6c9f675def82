"""``loratool convert``: options, outputs, one-line errors, JSON, dry run, metadata and hashes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.core.modules import Adapter, LokrModule, LoraModule
from loratool.formats import read_adapter, write_adapter
from loratool.io.hashes import check_hash
from loratool.io.safetensors import SafetensorsFile


def _adapter(lokr: bool = False) -> Adapter:
    g = torch.Generator().manual_seed(1)
    a = Adapter(base_model="sd1", source_format="kohya",
                metadata={"ss_learning_rate": "1e-4", "ss_output_name": "x", "sshs_model_hash": "0" * 64})
    for i in range(3):
        a.add(LoraModule("unet", f"down_blocks.0.attentions.0.transformer_blocks.0.attn{1 + i % 2}.to_{'qkv'[i]}",
                         alpha=2.0 + i, down=torch.randn(4, 320, generator=g), up=torch.randn(320, 4, generator=g)))
    if lokr:
        a.add(LokrModule("unet", "down_blocks.0.attentions.0.proj_in", alpha=1.0, w1=torch.randn(4, 4, generator=g),
                         w2a=torch.randn(80, 2, generator=g), w2b=torch.randn(2, 80, generator=g)))
    return a


@pytest.fixture
def kohya_file(tmp_path):
    path = tmp_path / "in.safetensors"
    write_adapter(_adapter(), path, "kohya")
    return path


def run(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args)])


@pytest.mark.parametrize("to", ["diffusers", "comfyui", "aitoolkit-not"])
def test_convert_formats_and_unknown_choice(kohya_file, tmp_path, to):
    out = tmp_path / "out.safetensors"
    result = run(kohya_file, "--to", to, "-o", out)
    if to == "aitoolkit-not":
        assert result.exit_code == 2 and "Invalid value for '--to'" in result.output
        return
    assert result.exit_code == 0, result.output
    src, got = read_adapter(kohya_file), read_adapter(out)
    for key, m in src.modules.items():
        assert torch.equal(got.modules[key].down, m.down) and got.modules[key].scale == m.scale
    assert check_hash(out) is True
    with SafetensorsFile(out) as f:
        meta = f.metadata
    assert meta["ss_learning_rate"] == "1e-4" and meta["loratool.command"] == "convert"
    assert json.loads(meta["loratool.convert"])["exact"] is True


def test_json_report_and_quiet(kohya_file, tmp_path):
    result = run(kohya_file, "--to", "diffusers", "-o", tmp_path / "o.safetensors", "--json")
    data = json.loads(result.output)
    assert data["exact"] and data["counts"] == {"rename": 3} and data["target"] == "diffusers"
    quiet = run(kohya_file, "--to", "kohya", "-o", tmp_path / "q.safetensors", "-q")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_dry_run_writes_nothing_and_prints_the_mapping(kohya_file, tmp_path):
    out = tmp_path / "never.safetensors"
    result = run(kohya_file, "--to", "diffusers", "-o", out, "--dry-run", "--json")
    assert result.exit_code == 0 and not out.exists()
    mapping = json.loads(result.output)["mapping"]
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert mapping[key] == [f"{key}.lora_A.weight", f"{key}.lora_B.weight"]


def test_lossy_only_when_asked_and_errors_printed(tmp_path):
    src = tmp_path / "lokr.safetensors"
    write_adapter(_adapter(lokr=True), src, "kohya")
    out = tmp_path / "o.safetensors"
    refused = run(src, "--to", "diffusers", "-o", out)
    assert refused.exit_code == 1 and not out.exists()
    assert refused.output.startswith("loratool: error: ") and "proj_in: a lokr module" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    ok = run(src, "--to", "diffusers", "-o", out, "--rank", "4")
    assert ok.exit_code == 0, ok.output
    # a short summary by default (count, the largest error and where), every module with -v
    assert "lossy: 1 module made LoRA" in ok.output and "unet.down_blocks.0.attentions.0.proj_in" in ok.output
    assert read_adapter(out).modules["unet.down_blocks.0.attentions.0.proj_in"].rank == 4
    listed = run(src, "--to", "diffusers", "-o", out, "--rank", "4", "--force", "-v")
    assert "r=4    lokr  unet.down_blocks.0.attentions.0.proj_in" in listed.output  # the per-module row


def test_drop_unknown_lists_what_was_dropped(tmp_path):
    src = tmp_path / "lokr.safetensors"
    write_adapter(_adapter(lokr=True), src, "kohya")
    out = tmp_path / "o.safetensors"
    result = run(src, "--to", "diffusers", "-o", out, "--drop-unknown", "--json")
    data = json.loads(result.stdout)
    assert [d["key"] for d in data["dropped"]] == ["unet.down_blocks.0.attentions.0.proj_in"]
    assert len(read_adapter(out).modules) == 3
    # issue 14: written without a module, so the exit code, stderr and the file itself say so
    assert result.exit_code == 3 and "skipped: unet.down_blocks.0.attentions.0.proj_in" in result.stderr
    skipped = json.loads(read_adapter(out).metadata["loratool.skipped"])
    assert [s["module"] for s in skipped] == ["unet.down_blocks.0.attentions.0.proj_in"]


def test_existing_output_and_input_protected(kohya_file, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    result = run(kohya_file, "--to", "kohya", "-o", out)
    assert result.exit_code == 1 and out.read_bytes() == b"keep"
    before = kohya_file.read_bytes()
    same = run(kohya_file, "--to", "kohya", "-o", kohya_file, "--force")
    assert same.exit_code == 1 and kohya_file.read_bytes() == before
    assert run(kohya_file, "--to", "kohya", "-o", out, "--force").exit_code == 0


def test_dtype_and_peft_folder(kohya_file, tmp_path):
    out = tmp_path / "half.safetensors"
    assert run(kohya_file, "--to", "kohya", "-o", out, "--dtype", "bf16").exit_code == 0
    with SafetensorsFile(out) as f:
        assert {f.info(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {"BF16"}
    folder = tmp_path / "peft"
    result = run(kohya_file, "--to", "peft", "-o", folder)
    assert result.exit_code == 0, result.output
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and read_adapter(folder).modules.keys() == read_adapter(kohya_file).modules.keys()


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\r\n")
    result = run(bad, "--to", "kohya", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 1 and result.output.startswith("loratool: error: ")
    assert len(result.output.strip().splitlines()) == 1
