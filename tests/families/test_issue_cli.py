"""Issue 16 as a user meets it, through the CLI: the two conversions that wrote names no loader reads, the families
reported as Flux or unknown, the Flux-or-Chroma LoRA whose keys cannot tell (both said, --arch decides), an unknown
family refused rather than respelt, and the retargetings (each left-out module listed)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.formats import read_adapter
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors

SUFFIX = {"down": (".lora_down.weight", ".lora_up.weight"), "A": (".lora_A.weight", ".lora_B.weight")}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def lora_file(path, stems: dict[str, tuple[int, int]], style: str = "down", alpha: bool = True):
    """Rank-2 random factors under each ``stem`` at its (out, in) shape; an ``.alpha`` each for kohya styles."""
    g = torch.Generator().manual_seed(len(stems))
    down, up = SUFFIX[style]
    tensors = {}
    for stem, (rows, cols) in stems.items():
        tensors[stem + down] = torch.randn(2, cols, generator=g) * 0.1
        tensors[stem + up] = torch.randn(rows, 2, generator=g) * 0.1
        if alpha:
            tensors[stem + ".alpha"] = torch.tensor(1.0)
    write_safetensors(path, tensors)
    return path


def keys_of(path) -> set[str]:
    with SafetensorsFile(path) as f:
        return set(f.keys())


WAN_MUSUBI = {f"lora_unet_blocks_{i}_{m}": (5120, 5120) for i in range(2)
              for m in ("self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o",
                        "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_o")}


def test_wan_musubi_to_diffusers_names_what_diffusers_reads(tmp_path):
    """Was: lora_unet_blocks_0_self_attn_q → transformer.blocks.1.cross.attn.k (exit 0)."""
    src = lora_file(tmp_path / "musubi.safetensors", WAN_MUSUBI)
    out = tmp_path / "diffusers.safetensors"
    run("convert", src, "--to", "diffusers", "-o", out, "-q")
    stems = {k.rsplit(".", 2)[0] for k in keys_of(out)}
    assert "transformer.blocks.0.attn1.to_q" in stems and "transformer.blocks.1.attn2.to_k" in stems
    assert not [s for s in stems if "cross" in s or "self" in s]
    assert read_adapter(out).base_model == "wan"


def test_wan_diffusers_to_kohya_names_what_comfyui_reads(tmp_path):
    """Was: transformer.blocks.0.attn1.to_q → lora_transformer_blocks_0_attn1_to_q, which ComfyUI ignores."""
    stems = {f"transformer.blocks.{i}.{m}": (5120, 5120) for i in range(2) for m in ("attn1.to_q", "attn2.to_out.0")}
    src = lora_file(tmp_path / "diffusers.safetensors", stems, "A", alpha=False)
    out = tmp_path / "kohya.safetensors"
    run("convert", src, "--to", "kohya", "-o", out, "-q")
    names = {k.split(".")[0] for k in keys_of(out)}
    assert names == {"lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_cross_attn_o",
                     "lora_unet_blocks_1_self_attn_q", "lora_unet_blocks_1_cross_attn_o"}


@pytest.mark.parametrize("family,stems,style", [
    ("qwen-image", {f"lora_unet_transformer_blocks_{i}_{m}": (3072, 3072) for i in (0, 59)
                    for m in ("attn_to_q", "attn_add_k_proj", "attn_to_add_out")} |
     {"lora_unet_transformer_blocks_3_img_mlp_net_0_proj": (12288, 3072)}, "down"),  # musubi (was: Flux)
    ("hunyuan-video", {"transformer.double_blocks.0.img_attn_qkv": (9216, 3072),
                       "transformer.double_blocks.19.txt_mlp.fc1": (12288, 3072),
                       "transformer.single_blocks.39.linear2": (3072, 15360)}, "A"),  # diffusion-pipe (was: Flux)
    ("wan", WAN_MUSUBI, "down"),  # musubi (was: unknown)
    ("z-image", {f"lora_unet_layers_{i}_attention_{m}": (3840, 3840) for i in (0, 29) for m in ("to_q", "to_out_0")} |
     {"lora_unet_layers_4_feed_forward_w1": (10240, 3840)}, "down"),  # musubi (was: unknown)
])
def test_families_detected_by_their_own_name(tmp_path, family, stems, style):
    src = lora_file(tmp_path / "x.safetensors", stems, style, alpha=style == "down")
    report = json.loads(run("inspect", src, "--json"))[0]
    assert report["base_model"] == family, report["base_model_detection"]
    assert report["components"] == {"transformer": len(stems)}


def test_flux_or_chroma_both_said_and_arch_decides(tmp_path):
    """A Flux LoRA without modulation keys fits Chroma as well: inspect says both; convert --arch chroma writes a
    Chroma file (its metadata then decides on reading)."""
    stems = {f"lora_unet_double_blocks_{i}_img_attn_proj": (3072, 3072) for i in range(2)}
    src = lora_file(tmp_path / "flux.safetensors", stems)
    said = run("inspect", src)
    assert "flux" in said and "chroma" in said
    detection = json.loads(run("inspect", src, "--json"))[0]["base_model_detection"]
    assert {"flux", "chroma"} <= set(detection["candidates"])
    out = tmp_path / "chroma.safetensors"
    run("convert", src, "--arch", "chroma", "--to", "diffusers", "-o", out, "-q")
    assert read_adapter(out).base_model == "chroma"


def test_unknown_family_refused_not_respelt(tmp_path):
    """An unknown family's diffusers names are never guessed into kohya ids: refused with the way out; --to
    diffusers keeps them verbatim."""
    stems = {"transformer.mystery_blocks.0.attn.to_q": (64, 64), "transformer.mystery_blocks.1.ff.proj": (64, 64)}
    src = lora_file(tmp_path / "unknown.safetensors", stems, "A", alpha=False)
    result = invoke("convert", src, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 1 and "without guessing" in result.output
    assert not (tmp_path / "k.safetensors").exists()
    out = tmp_path / "same.safetensors"
    run("convert", src, "--to", "diffusers", "-o", out, "-q")
    assert {k.rsplit(".", 2)[0] for k in keys_of(out)} == set(stems)


@pytest.mark.parametrize("retarget,stems,left_out", [
    ("wan-t2v", WAN_MUSUBI | {"lora_unet_blocks_1_cross_attn_k_img": (5120, 5120),
                              "lora_unet_blocks_1_cross_attn_v_img": (5120, 5120)},
     ["transformer.blocks.1.attn2.add_k_proj", "transformer.blocks.1.attn2.add_v_proj"]),
    ("chroma", {"lora_unet_double_blocks_0_img_attn_proj": (3072, 3072),
                "lora_unet_double_blocks_0_img_mod_lin": (18432, 3072),
                "lora_unet_single_blocks_2_modulation_lin": (9216, 3072)},
     ["transformer.single_transformer_blocks.2.norm.linear", "transformer.transformer_blocks.0.norm1.linear"]),
])
def test_retarget_lists_every_module_left_out(tmp_path, retarget, stems, left_out):
    src = lora_file(tmp_path / "in.safetensors", stems)
    out = tmp_path / "out.safetensors"
    report = json.loads(run("convert", src, "--retarget", retarget, "--to", "kohya", "-o", out, "--json"))
    assert sorted(r["key"] for r in report["retargeted"]) == left_out
    assert all(r["why"] for r in report["retargeted"])
    kept = read_adapter(out)
    assert len(kept.modules) == len(stems) - len(left_out) and not set(left_out) & set(kept.modules)


def test_unknown_family_kohya_ids_refused_as_diffusers_kept_as_kohya(tmp_path):
    """The other direction: kohya ids of an unknown family are not split into guessed diffusers paths; --to kohya
    keeps them verbatim and says so."""
    stems = {"lora_unet_mystery_blocks_0_attn_q": (64, 64), "lora_unet_mystery_blocks_1_mlp_fc1": (64, 64)}
    src = lora_file(tmp_path / "unknown.safetensors", stems)
    result = invoke("convert", src, "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 1 and "without guessing" in result.output
    out = tmp_path / "same.safetensors"
    said = run("convert", src, "--to", "kohya", "-o", out)
    assert "names are kept as the file has them" in said
    assert {k.split(".")[0] for k in keys_of(out)} == set(stems)
