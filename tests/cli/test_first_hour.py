"""A newcomer's first hour (issue 15): piped output, short summaries, output names, the --targets vocabulary,
--to/--arch choices, progress off a terminal, and the warnings a careful tool gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import loratool.cli.render as render
from loratool.cli.main import cli
from loratool.core.modules import Adapter, LoraModule
from loratool.formats import read_adapter, write_adapter
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
FF = "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
SHAPES = {Q: (320, 320), K: (1280, 768), FF: (640, 2560), TE: (768, 768)}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def lora_file(path: Path, keys=tuple(SHAPES), rank: int = 4, alpha: float | None = 2.0, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    a = Adapter(base_model="sd1")
    for key in keys:
        (out, inp), (comp, p) = SHAPES[key], key.split(".", 1)
        a.add(LoraModule(comp, p, alpha=alpha, down=torch.randn(rank, inp, generator=g) * 0.1,
                         up=torch.randn(out, rank, generator=g) * 0.1))
    write_adapter(a, path, "kohya")
    return path


@pytest.fixture
def lora(tmp_path) -> Path:
    return lora_file(tmp_path / "a.safetensors")


@pytest.fixture
def generic_pair(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g)}
    tuned = {k: v + torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g) * 0.05
             for k, v in base.items()}
    write_safetensors(tmp_path / "b.safetensors", base, None)
    write_safetensors(tmp_path / "t.safetensors", tuned, None)
    return tmp_path / "b.safetensors", tmp_path / "t.safetensors"


# -- output ------------------------------------------------------------------------------------


def test_piped_output_is_not_padded(lora):
    out = run("inspect", lora).stdout
    assert out.strip() and all(line == line.rstrip() for line in out.splitlines())
    assert max(len(line) for line in out.splitlines()) < 120


def test_mix_prints_a_summary_and_the_table_only_with_v(lora, tmp_path):
    other = lora_file(tmp_path / "b.safetensors", seed=1)
    short = run("mix", f"{lora}:0.5", other, "-o", tmp_path / "m")
    assert short.exit_code == 0, short.output
    lines = short.stdout.splitlines()
    assert len(lines) <= 5 and not any(Q in line for line in lines), short.stdout
    assert "4 (concat 4)" in short.stdout and "exact" in short.stdout and "m.safetensors" in short.stdout
    table = run("mix", f"{lora}:0.5", other, "-o", tmp_path / "m", "--force", "-v").stdout
    assert all(key in table for key in SHAPES)
    assert json.loads(run("mix", lora, other, "-o", tmp_path / "m", "--force", "--json").stdout)["per_module"]


# -- output names ------------------------------------------------------------------------------


def test_single_file_outputs_get_their_extension(lora, tmp_path):
    for args in (("mix", lora), ("scale", lora, "0.5"), ("resize", lora, "-r", "2"),
                 ("convert", lora, "--to", "diffusers")):
        name = tmp_path / f"{args[0]}-out"
        res = run(*args, "-o", name, "-q")
        assert res.exit_code == 0, res.output
        assert (tmp_path / f"{args[0]}-out.safetensors").is_file() and not name.exists(), args


def test_an_output_name_that_contradicts_the_layout_is_explained(lora, tmp_path):
    peft = tmp_path / "peft"
    assert run("convert", lora, "--to", "peft", "-o", peft, "-q").exit_code == 0
    res = run("scale", peft, "0.5", "-o", tmp_path / "half.safetensors")
    assert res.exit_code == 2 and "peft layout is a folder" in res.output and "--to kohya" in res.output
    assert not (tmp_path / "half.safetensors").exists()
    assert run("scale", peft, "0.5", "-o", tmp_path / "half", "-q").exit_code == 0
    assert (tmp_path / "half" / "unet" / "adapter_config.json").is_file()  # a peft folder per component
    res = run("mix", lora, "-o", tmp_path / "m.pt")
    assert res.exit_code == 2 and "writes safetensors, not .pt" in res.output and not (tmp_path / "m.pt").exists()


def test_extract_defaults_kohya_for_a_model_and_peft_for_a_generic_pair(generic_pair, tmp_path):
    base, tuned = generic_pair
    res = run("extract", base, tuned, "-r", 2, "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "peft layout is a folder" in res.output
    out = tmp_path / "x"
    assert run("extract", base, tuned, "-r", 2, "-o", out, "-q").exit_code == 0
    assert (out / "adapter_config.json").is_file()
    help_text = " ".join(run("extract", "--help").stdout.split())
    assert "kohya .safetensors file" in help_text and "peft folder" in help_text


# -- vocabulary and choices --------------------------------------------------------------------


def test_generic_extraction_says_what_it_took(generic_pair, tmp_path):
    """Every weight of a generic pair: the metadata says targets all (not attn), the report names modules
    as the files do (not model.model.layers...), and an explicit --targets gets a note."""
    base, tuned = generic_pair
    out = tmp_path / "x"
    res = run("extract", base, tuned, "-r", 2, "-o", out, "--targets", "attn", "--json")
    assert res.exit_code == 0, res.output
    assert "--targets attn names layers of a known model family" in res.stderr
    report = json.loads(res.stdout)
    assert {m["key"] for m in report["modules"]} == {"model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"}
    meta = SafetensorsFile(out / "adapter_model.safetensors").metadata
    assert json.loads(meta["loratool.parameters"])["targets"] == "all"
    shown = run("inspect", out).stdout  # the per-module report in the metadata is cut, not printed whole
    assert "characters; --json shows all" in shown and max(map(len, shown.splitlines())) < 200
    # no family detected: said in words (it used to read "unknown (by nothing)")
    assert "base model: unknown (neither the keys nor the metadata name a model family)" in shown


def test_the_targets_vocabulary_is_listed_and_old_names_work(tmp_path):
    for command in ("extract", "ratio", "train"):
        text = " ".join(run(command, "--help").stdout.split())
        assert all(name in text for name in ("attn:", "transformer:", "transformer+conv:", "all:")), command
    old = json.loads(run("ratio", "--model", "sd1", "--targets", "attn+conv", "-r", "4", "--json").stdout)
    assert old["targets"] == "transformer+conv"
    assert run("ratio", "--model", "sd1", "--targets", "convs").exit_code == 2


def test_arch_is_a_choice_from_the_registry(lora, tmp_path):
    from loratool.arch import family_names

    shown = run("extract", "--help").stdout.split("--arch sd1", 1)[1].split()[0].split("|")
    shown[0] = "sd1"
    assert shown[:5] == ["sd1", "sd2", "sdxl", "flux", "sd3"] and shown[-1] == "generic"
    assert set(family_names()) <= set(shown)  # every family of the registry, no free text
    res = run("scale", lora, "0.5", "--lbw", "MIDD", "--arch", "SD15", "-o", tmp_path / "s", "-q")
    assert res.exit_code == 0, res.output  # an alias, any case
    res = run("scale", lora, "0.5", "--arch", "sdxxl", "-o", tmp_path / "s2")
    assert res.exit_code == 2 and "sdxxl" in res.output


def test_to_lycoris_writes_lycoris_or_refuses(lora, tmp_path):
    res = run("scale", lora, "0.5", "--to", "lycoris", "-o", tmp_path / "ly")
    assert res.exit_code == 1 and "lycoris layout holds" in res.output and "text_encoder" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "ly.safetensors").exists()
    unet_only = lora_file(tmp_path / "u.safetensors", keys=(Q, K, FF))
    assert run("scale", unet_only, "0.5", "--to", "lycoris", "-o", tmp_path / "ly", "-q").exit_code == 0
    assert read_adapter(tmp_path / "ly.safetensors").source_format == "lycoris"


def test_help_texts_say_what_options_do():
    convert = " ".join(run("convert", "--help").stdout.split())
    assert "--rank-cap INTEGER RANGE --lossy: the highest rank" in convert
    extract = " ".join(run("extract", "--help").stdout.split())
    assert "at least 8 (default: the rank or 8, whichever is more" in extract
    train = " ".join(run("train", "--help").stdout.split())
    assert "pip install 'loratool[train]'" in train


def test_train_without_its_extra_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    res = run("train", "--model", "m", "--instance-data", "d", "--instance-prompt", "p", "-o", tmp_path / "o")
    assert res.exit_code == 1
    assert res.output.strip() == ("loratool: error: train needs the [train] extra, which is not installed "
                                  "(diffusers missing): pip install 'loratool[train]'")


# -- progress ----------------------------------------------------------------------------------


def test_plain_progress_lines_off_a_terminal(monkeypatch):
    import io

    monkeypatch.setattr(render, "QUIET_SECONDS", 0.0)
    stream = io.StringIO()
    bar = render.Progress("mix", 10, unit="modules", lines=4, in_bytes=False, show=True, stream=stream)
    for done in range(1, 11):
        bar.update(done)
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[2].split("%")[0].strip() for line in lines] == ["30", "50", "80", "100"]
    assert lines[-1].startswith("loratool: mix: 100% (10/10 modules)")
    hidden = io.StringIO()
    quiet = render.Progress("mix", 10, unit="modules", lines=4, in_bytes=False, show=False, stream=hidden)
    quiet.update(10)
    assert hidden.getvalue() == ""


def test_mix_and_train_report_progress_when_piped(lora, tmp_path, monkeypatch):
    monkeypatch.setattr(render, "QUIET_SECONDS", 0.0)
    res = run("mix", lora, "-o", tmp_path / "m")
    assert "loratool: mix: 100% (4/4 modules)" in res.stderr
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    res = run("train", "--model", repo / "fixtures" / "tiny-sd", "--instance-data", repo / "fixtures" / "tiny-instance",
              "--instance-prompt", "a sks shape", "--resolution", "16", "-r", "2", "--steps", "2", "--device", "cpu",
              "--targets", "transformer", "--components", "unet,text_encoder", "-o", out)
    assert res.exit_code == 0, res.output
    assert "loratool: train: 50% (1/2 steps, loss" in res.stderr and "loratool: train: 100% (2/2 steps" in res.stderr
    meta = SafetensorsFile(out / "lora.safetensors").metadata
    params = json.loads(meta["loratool.parameters"])
    assert params["targets"] == "transformer" and params["components"] == ["unet", "text_encoder"]
    keys = SafetensorsFile(out / "lora.safetensors").keys()
    assert any("mlp_fc1" in k for k in keys) and any("ff_net_2" in k for k in keys)  # the transformer set


# -- warnings ----------------------------------------------------------------------------------


def test_extract_says_when_layers_are_narrower_than_the_rank(generic_pair, tmp_path):
    base, tuned = generic_pair
    res = run("extract", base, tuned, "-r", 500, "-o", tmp_path / "x", "-q")
    assert res.exit_code == 0 and res.output == ""
    res = run("extract", base, tuned, "-r", 500, "-o", tmp_path / "x", "--force")
    assert "2 of 2 layers are narrower than the rank asked for" in res.stderr and "-> rank 64" in res.stderr


def test_mix_svd_warns_of_a_large_residual(lora, tmp_path):
    other = lora_file(tmp_path / "b.safetensors", seed=5)
    res = run("mix", lora, other, "--mode", "svd", "-r", "2", "-o", tmp_path / "m")
    assert res.exit_code == 0
    assert "leaves a large residual" in res.stderr and "--mode concat is exact" in res.stderr
    quiet = run("mix", lora, other, "--mode", "svd", "-r", "8", "-o", tmp_path / "m2")
    assert "residual" not in quiet.stderr  # rank 8 holds two rank-4 LoRAs exactly


def test_scale_of_a_file_without_alphas_says_what_it_does(tmp_path):
    bare = lora_file(tmp_path / "bare.safetensors", alpha=None)
    res = run("scale", bare, "0.5", "-o", tmp_path / "half")
    assert res.exit_code == 0 and "stores no alpha for 4 of 4 modules" in res.stderr
    assert "none stored: loaders apply scale 1" in run("inspect", bare).stdout
    assert "no alpha" not in run("scale", tmp_path / "half.safetensors", "2", "-o", tmp_path / "x").stderr.replace(
        "stores no alpha", "")  # only the note, once


def test_merging_a_lora_that_does_not_fit_is_one_short_line(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    g = torch.Generator().manual_seed(0)
    write_safetensors(ckpt, {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
                             torch.randn(320, 320, generator=g).half()}, None)
    many = Adapter(base_model="sd1")
    for i in range(40):
        many.add(LoraModule("text_encoder", f"text_model.encoder.layers.{i % 12}.mlp.fc{1 + i // 12}"
                            if i < 24 else f"text_model.encoder.layers.{i - 24}.self_attn.{'qkvo'[i % 4]}_proj",
                            alpha=1.0, down=torch.randn(1, 768 if i < 12 or i >= 24 else 3072, generator=g),
                            up=torch.randn(3072 if i < 12 else 768, 1, generator=g)))
    write_adapter(many, tmp_path / "te.safetensors", "kohya")
    res = run("merge", ckpt, tmp_path / "te.safetensors", "--arch", "sd1", "-o", tmp_path / "baked.safetensors")
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    line = res.output.strip()
    assert "40 of 40 LoRA modules match no sd1 checkpoint weight (e.g. " in line and len(line) < 400
    assert "nothing to merge" in line and not (tmp_path / "baked.safetensors").exists()
