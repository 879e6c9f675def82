"""`loratool merge` end to end on a tiny SD1-layout checkpoint (real key names, a few small layers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.core.modules import Adapter, LoraModule
from loratool.formats import read_adapter, write_adapter
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors

P = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0."
CKPT = {  # canonical module -> (LDM key, shape)
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (P + "attn1.to_q.weight", (320, 320)),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (P + "attn2.to_k.weight", (320, 768)),
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": (
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", (3072, 768)),
}
EXTRA = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], Adapter]:
    g = torch.Generator().manual_seed(0)
    tensors = {ck: torch.randn(*shape, generator=g).half() for ck, shape in CKPT.values()}
    tensors[P + "attn1.to_q.bias"] = torch.zeros(320).half()  # untouched
    tensors["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3, generator=g).half()
    ckpt = tmp_path / "sd15.safetensors"
    write_safetensors(ckpt, tensors)
    a = Adapter(base_model="sd1")
    for key, (_, shape) in CKPT.items():
        comp, path = key.split(".", 1)
        a.add(LoraModule(component=comp, path=path, alpha=4.0, down=torch.randn(8, shape[1], generator=g) * 0.1,
                         up=torch.randn(shape[0], 8, generator=g) * 0.1))
    lora = tmp_path / "lora.safetensors"
    write_adapter(a, lora, "kohya")
    return ckpt, lora, tensors, read_adapter(lora)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_merge_detects_sd1_and_bakes(files, tmp_path: Path) -> None:
    ckpt, lora, before, a = files
    out = tmp_path / "baked.safetensors"
    res = run("merge", ckpt, f"{lora}:0.6", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["arch"] == "sd1" and report["matched_modules"] == 3 and report["tensors_written"] == 3
    with SafetensorsFile(out) as f:
        for key, (ck, _) in CKPT.items():
            want = before[ck].double() + 0.6 * a.modules[key].delta(torch.float64)
            got = f.get(ck)
            assert got.dtype == torch.float16
            assert torch.allclose(got.double(), want, rtol=2**-10, atol=2**-20), key
        for ck in set(before) - {ck for ck, _ in CKPT.values()}:
            assert torch.equal(f.get(ck), before[ck])


def test_dry_run_unmatched_and_override(files, tmp_path: Path) -> None:
    ckpt, lora, _, a = files
    g = torch.Generator().manual_seed(3)
    comp, path = EXTRA.split(".", 1)
    a.add(LoraModule(component=comp, path=path, alpha=1.0, down=torch.randn(2, 640, generator=g),
                     up=torch.randn(640, 2, generator=g)))
    lora2 = tmp_path / "lora2.safetensors"
    write_adapter(a, lora2, "kohya")
    out = tmp_path / "baked.safetensors"
    res = run("merge", ckpt, lora2, "-o", out)
    assert res.exit_code == 1 and "1 of 4 LoRA modules match no sd1" in res.output and "to_v" in res.output
    res = run("merge", ckpt, lora2, "--dry-run")
    assert res.exit_code == 1  # unmatched is an error in a dry run too
    res = run("merge", ckpt, lora2, "--dry-run", "--allow-unmatched")
    assert res.exit_code == 0 and "3 LoRA modules matched, 1 unmatched" in res.output and not out.exists()
    res = run("merge", ckpt, f"{lora2}:-1", "--allow-unmatched", "-o", out, "-q")
    # issue 14: written without a module, so exit 3, the module on stderr and in the file's metadata
    assert res.exit_code == 3 and res.stdout == "" and out.exists()
    assert f"skipped: {lora2}: {EXTRA}" in res.stderr
    with SafetensorsFile(out) as f:
        assert EXTRA in f.metadata["loratool.skipped"]
    res = run("merge", ckpt, lora, "--arch", "sdxl", "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 1 and "for sd1" in res.output
