"""The other commands on the new families, end to end through the CLI: inspect (family, variant, blocks in model
order, components), ratio --model <family>-<variant>, scale --lbw at the file's own sizes, resize and mix keeping
the input's layout, merge into a single-file checkpoint in the family's own names (fused q/k/v rows included,
bare keys as the released files have them) and extract from the base/tuned pair back to a LoRA of the family."""

from __future__ import annotations

import json
from pathlib import Path

import family_models as fm
import pytest
import torch
from click.testing import CliRunner

from loratool.arch import family, load_arch
from loratool.arch.convert import diffusers_to_checkpoint
from loratool.cli.main import cli
from loratool.core.modules import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.formats import read_adapter, write_adapter
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors
from loratool.ops.convert import convert


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _wan_13b(tmp_path: Path, layout: str = "musubi") -> Path:
    """A Wan 1.3B LoRA (blocks 0, 7 and 29: the sizes tell the variant) in ``layout``."""
    fam = load_arch("wan-1.3b")
    g = torch.Generator().manual_seed(1)
    a = Adapter(base_model="wan")
    for key in ("transformer.blocks.0.attn1.to_q", "transformer.blocks.7.attn2.to_k",
                "transformer.blocks.29.ffn.net.0.proj"):
        out, inp = fam.modules[key].shape
        a.add(LoraModule("transformer", key.split(".", 1)[1], alpha=2.0, down=torch.randn(4, inp, generator=g) * 0.1,
                         up=torch.randn(out, 4, generator=g) * 0.1))
    path = tmp_path / "wan.safetensors"
    write_adapter(convert(a, layout)[0], path, layout)
    return path


def test_inspect_names_family_variant_and_blocks(tmp_path):
    report = json.loads(run("inspect", _wan_13b(tmp_path), "--modules", "--json"))[0]
    assert report["base_model"] == "wan" and report["format"] == "musubi"
    assert report["base_model_detection"]["variant"] == "1.3B"
    assert list(report["blocks"]) == ["transformer:blocks.0", "transformer:blocks.7", "transformer:blocks.29"]
    assert report["components"] == {"transformer": 3}


def test_ratio_of_a_family_variant():
    small = json.loads(run("ratio", "--model", "wan-1.3b", "-r", "16", "--json"))
    large = json.loads(run("ratio", "--model", "wan-14b", "-r", "16", "--json"))
    assert small["layers"] == 30 * 10 and large["layers"] == 40 * 10  # a text-to-video Wan: no k_img/v_img
    assert large["full_params"] > 8 * small["full_params"]


def test_scale_lbw_at_the_files_sizes(tmp_path):
    """Wan 1.3B has 30 blocks: a 32-value vector (IN, B00-B29, OUT) is its vector; block 7 weighed 0."""
    src = _wan_13b(tmp_path)
    vector = ["1"] * 32
    vector[1 + 7] = "0"
    out = tmp_path / "scaled.safetensors"
    run("scale", src, "1", "--lbw", ",".join(vector), "-o", out, "-q")
    before, after = read_adapter(src), read_adapter(out)
    assert after.source_format == "musubi"
    assert not after.modules["transformer.blocks.7.attn2.to_k"].delta().any()
    key = "transformer.blocks.0.attn1.to_q"
    assert torch.allclose(after.modules[key].delta(), before.modules[key].delta())


def test_resize_and_mix_keep_the_layout(tmp_path):
    src = _wan_13b(tmp_path, "bfl")
    resized = tmp_path / "r.safetensors"
    run("resize", src, "--rank", "2", "-o", resized, "-q")
    assert read_adapter(resized).source_format == "bfl" and read_adapter(resized).base_model == "wan"
    mixed = tmp_path / "m.safetensors"
    run("mix", f"{src}:0.5", f"{resized}:0.5", "-o", mixed, "-q")
    out = read_adapter(mixed)
    assert out.source_format == "bfl" and out.base_model == "wan" and len(out.modules) == 3


@pytest.fixture
def hunyuan(tmp_path: Path):
    """The tiny HunyuanVideo as a single-file checkpoint in Tencent names (bare keys, fused img_attn_qkv and
    linear1), and a kohya LoRA on a fused q/k/v, a single block's linear1 and a plain layer."""
    m = fm.model("hunyuan-video")
    dims = {f"transformer.{k}": s for k, s in fm.linears(m).items()}
    table = family("hunyuan-video").sized(dims).table
    state = {k: v.detach() for k, v in m.state_dict().items()}
    prefix = table.checkpoint_prefix["transformer"]
    ckpt = {key[len(prefix):]: diffusers_to_checkpoint(table, key, lambda p: state[p.name]).contiguous()
            for key in table.checkpoint_params}
    base = tmp_path / "hunyuan.safetensors"
    write_safetensors(base, ckpt)
    a = fm.adapter("hunyuan-video", fm.pattern(r"^transformer_blocks\.1\.attn\.(to_q|to_k|to_v)$",
                                               r"^single_transformer_blocks\.0\.(attn\.to_|proj_mlp)",
                                               r"^transformer_blocks\.0\.ff_context\.net\.2$"))
    lora = tmp_path / "lora.safetensors"
    write_adapter(convert(a, "kohya")[0], lora, "kohya")
    return base, ckpt, lora, a


def test_merge_into_single_file_and_extract_back(tmp_path, hunyuan):
    base, ckpt, lora, a = hunyuan
    merged = tmp_path / "merged.safetensors"
    report = json.loads(run("merge", base, f"{lora}:1", "-o", merged, "--json"))
    assert report["arch"] == "hunyuan-video" and report["unmatched_modules"] == 0
    fused = {"double_blocks.1.img_attn_qkv.weight": [f"transformer_blocks.1.attn.to_{x}" for x in "qkv"],
             "single_blocks.0.linear1.weight": [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]
             + ["single_transformer_blocks.0.proj_mlp"],
             "double_blocks.0.txt_mlp.fc2.weight": ["transformer_blocks.0.ff_context.net.2"]}
    with SafetensorsFile(merged) as f:
        for key, parts in fused.items():
            delta = torch.cat([a.modules[f"transformer.{p}"].delta(torch.float64) for p in parts])
            assert torch.allclose(f.get(key).double(), ckpt[key].double() + delta, atol=1e-6), key
        untouched = "double_blocks.0.img_mlp.fc1.weight"
        assert torch.equal(f.get(untouched), ckpt[untouched])
    out = tmp_path / "extracted.safetensors"
    run("extract", base, merged, "-r", "8", "--targets", "all", "--to", "kohya", "-o", out, "-q")
    back = read_adapter(out)
    assert back.base_model == "hunyuan-video" and back.source_format == "kohya"
    for key, parts in fused.items():
        stem = f"transformer.{parts[0].rsplit('.', 2)[0] if 'attn' in parts[0] else parts[0]}"
        got = [m for k, m in back.modules.items() if k.startswith(stem)]
        assert got, key


def _wan_pair(tmp_path):
    """A tiny Wan base/tuned pair in single-file names: one layer changed at rank 2 with its bias, one norm changed."""
    m = fm.model("wan")
    table = family("wan").sized({f"transformer.{k}": s for k, s in fm.linears(m).items()}).table
    state = {k: v.detach() for k, v in m.state_dict().items()}
    names = {f"{s.path}.{part}": s.checkpoint_key.removesuffix(".weight").removeprefix("model.diffusion_model.") + f".{part}"
             for s in table.modules.values() for part in ("weight", "bias") if f"{s.path}.{part}" in state}
    base = {names[k]: state[k].clone() for k in names}
    tuned = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(4)
    tuned["blocks.0.ffn.0.weight"] += torch.randn(32, 2, generator=g) @ torch.randn(2, 16, generator=g)
    tuned["blocks.0.ffn.0.bias"] += torch.randn(32, generator=g)
    tuned["blocks.1.norm3.weight"] += torch.randn(16, generator=g)
    paths = [tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"]
    for path, tensors in zip(paths, (base, tuned), strict=True):
        write_safetensors(path, {**tensors, "head.modulation": torch.zeros(1, 2, 16)})
    return paths, base, tuned


@pytest.mark.parametrize("layout,bias_key,norm_key", [
    ("bfl", "diffusion_model.blocks.0.ffn.0.diff_b", "diffusion_model.blocks.1.norm3.diff"),
    ("kohya", "lora_unet_blocks_0_ffn_0.diff_b", "lora_unet_blocks_1_norm3.diff"),
])
def test_extract_with_bias_and_norm_deltas(tmp_path, layout, bias_key, norm_key):
    """``extract --deltas both``: the LoRA gains its layers' bias deltas (.diff_b) and the changed norm weights
    (.diff on original norm3 = diffusers' norm2), as Wan's step-distillation LoRAs carry them; merged into the base
    it gives the tuned model back."""
    (b, t), base, tuned = _wan_pair(tmp_path)
    out = tmp_path / "distill.safetensors"
    run("extract", b, t, "-r", "4", "--targets", "all", "--deltas", "both", "--to", layout, "-o", out, "-q")
    with SafetensorsFile(out) as f:
        assert torch.allclose(f.get(bias_key), tuned["blocks.0.ffn.0.bias"] - base["blocks.0.ffn.0.bias"])
        assert torch.allclose(f.get(norm_key), tuned["blocks.1.norm3.weight"] - base["blocks.1.norm3.weight"])
    back = read_adapter(out)
    assert back.base_model == "wan" and not back.unknown and "transformer.blocks.1.norm2" in back.modules
    merged = tmp_path / "merged.safetensors"  # baked back into the base: the tuned model, bias and norm included
    run("merge", b, out, "-o", merged, "-q")
    with SafetensorsFile(merged) as f:
        for key in ("blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias", "blocks.1.norm3.weight"):
            assert torch.allclose(f.get(key), tuned[key], atol=1e-5), key


def test_extract_deltas_are_an_option(tmp_path):
    """Without --deltas nothing but the LoRA; with --deltas bias no norm; the report lists what was added."""
    (b, t), _, _ = _wan_pair(tmp_path)
    plain, biased = tmp_path / "plain.safetensors", tmp_path / "biased.safetensors"
    run("extract", b, t, "-r", "4", "--targets", "all", "--to", "bfl", "-o", plain, "-q")
    report = tmp_path / "report.json"
    said = run("extract", b, t, "-r", "4", "--targets", "all", "--deltas", "bias", "--to", "bfl", "-o", biased,
               "--report", report)
    assert "carried whole: 1 bias changes (.diff_b), 0 norm-weight changes" in said
    with SafetensorsFile(plain) as f:
        assert not [k for k in f.keys() if k.endswith((".diff", ".diff_b"))]
    with SafetensorsFile(biased) as f:
        assert [k for k in f.keys() if k.endswith((".diff", ".diff_b"))] == ["diffusion_model.blocks.0.ffn.0.diff_b"]
    assert json.loads(report.read_text())["summary"]["deltas"] == ["transformer.blocks.0.ffn.net.0.proj.bias"]


@pytest.mark.parametrize("args,words", [
    (["--arch", "generic", "--deltas", "norm"], "--deltas needs a model family"),
    (["--deltas", "both", "--to", "diffusers"], "no place for a bias change"),
    (["--deltas", "norm", "--to", "peft"], "LoRA factors only"),
])
def test_extract_deltas_refused_where_they_have_no_place(tmp_path, args, words):
    (b, t), _, _ = _wan_pair(tmp_path)
    result = CliRunner().invoke(cli, ["extract", str(b), str(t), *args, "-o", str(tmp_path / "x"), "-q"])
    assert result.exit_code == 1 and words in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_norm_deltas_only_where_the_table_lists_norms():
    from loratool.ops.extract_deltas import check_deltas

    check_deltas("wan", "bfl", {"bias", "norm"})
    check_deltas("flux", "kohya", {"bias"})
    with pytest.raises(LoraToolError, match="the flux table lists no norm weights"):
        check_deltas("flux", "kohya", {"norm"})
