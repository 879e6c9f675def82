"""``loratool extract`` through click's CliRunner on tiny checkpoints built here."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.formats import read_adapter
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors

ATTN = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
TE = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.weight"


def low_rank(m, n, r, gen):
    return torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen) * 0.05


@pytest.fixture
def sd1_pair(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {ATTN: torch.randn(320, 768, generator=gen), CONV: torch.randn(320, 320, 3, 3, generator=gen) * .05,
            TE: torch.randn(768, 3072, generator=gen)}
    tuned = {ATTN: base[ATTN] + low_rank(320, 768, 3, gen),
             CONV: base[CONV] + low_rank(320, 2880, 3, gen).reshape(320, 320, 3, 3),
             TE: base[TE] + low_rank(768, 3072, 2, gen)}
    write_safetensors(tmp_path / "base.safetensors", {k: v.half() for k, v in base.items()}, None)
    write_safetensors(tmp_path / "tuned.safetensors", {k: v.half() for k, v in tuned.items()}, None)
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


@pytest.fixture
def generic_pair(tmp_path):
    gen = torch.Generator().manual_seed(1)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=gen),
            "model.layers.0.mlp.down_proj.weight": torch.randn(64, 96, generator=gen),
            "model.norm.weight": torch.ones(64)}
    tuned = {k: v + (low_rank(*v.shape, 2, gen) if v.dim() == 2 else 0) for k, v in base.items()}
    write_safetensors(tmp_path / "b.safetensors", base, None)
    write_safetensors(tmp_path / "t.safetensors", tuned, None)
    return tmp_path / "b.safetensors", tmp_path / "t.safetensors"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_sd1_checkpoint_to_kohya_with_report_and_metadata(sd1_pair, tmp_path):
    base, tuned = sd1_pair
    out, rep = tmp_path / "lora.safetensors", tmp_path / "report.json"
    res = run("extract", base, tuned, "-r", 4, "--targets", "attn+conv", "--conv-rank", 3, "-o", out,
              "--report", rep, "-q")
    assert res.exit_code == 0, res.output
    assert res.output == ""
    f = SafetensorsFile(out)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in f.keys()
    assert tuple(f.info("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").shape) == (3, 320, 3, 3)
    assert f.info("lora_te_text_model_encoder_layers_3_mlp_fc2.lora_up.weight").shape == (768, 4)
    assert f.metadata["ss_base_model_version"].startswith("sd_v1")
    compact = json.loads(f.metadata["loratool.extract_report"])
    assert compact["summary"]["modules"] == 3
    full = json.loads(rep.read_text())
    assert {m["key"] for m in full["modules"]} >= {"unet.down_blocks.0.resnets.0.conv1"}
    assert full["summary"]["worst_rel_error"] < 2e-2  # fp16 storage of a rank-3 ΔW
    adapter = read_adapter(out)
    assert adapter.base_model == "sd1" and len(adapter.modules) == 3


def test_generic_to_peft_json_and_identical_bytes(generic_pair, tmp_path):
    base, tuned = generic_pair
    outs = []
    for name in ("a", "b"):
        res = run("extract", base, tuned, "-r", 2, "--arch", "generic", "-o", tmp_path / name, "--json")
        assert res.exit_code == 0, res.output
        data = json.loads(res.output)
        assert data["summary"]["modules"] == 2 and data["arch"] == "generic"
        outs.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    adapter = read_adapter(tmp_path / "a")
    assert sorted(adapter.modules) == ["model.model.layers.0.mlp.down_proj", "model.model.layers.0.mlp.up_proj"]


def test_undetected_pair_defaults_to_peft_and_sd1_to_kohya(generic_pair, sd1_pair, tmp_path):
    base, tuned = generic_pair  # no --arch, no --to: detection finds no known model
    res = run("extract", base, tuned, "-r", 2, "-o", tmp_path / "g", "--json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "g" / "adapter_config.json").is_file()
    res = run("extract", *sd1_pair, "-r", 2, "-o", tmp_path / "k.safetensors", "-q")
    assert res.exit_code == 0, res.output
    assert read_adapter(tmp_path / "k.safetensors").source_format == "kohya"


def test_dry_run_writes_nothing_and_lists_the_plan(sd1_pair, tmp_path):
    base, tuned = sd1_pair
    res = run("extract", base, tuned, "-r", 8, "--dry-run", "--json", "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["arch"] == "sd1" and [m["rank"] for m in plan["modules"]] == [8, 8]
    assert plan["output_bytes_at_most"] == 8 * (320 + 768) * 2 + 8 * (768 + 3072) * 2 + 8
    assert not (tmp_path / "x.safetensors").exists()
    res = run("extract", base, tuned, "-r", 8, "--dry-run", "--include", "attn2", "-v")  # -v: every module
    assert "attn2.to_k" in res.output and "mlp.fc2" not in res.output


def test_errors_are_one_line(sd1_pair, generic_pair, tmp_path):
    base, tuned = sd1_pair
    res = run("extract", base, generic_pair[1], "-r", 2, "--arch", "generic", "-o", tmp_path / "o")
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "loratool: error:" in res.output
    assert "missing" in res.output
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    res = run("extract", base, tuned, "-r", 2, "-o", tmp_path / "exists.safetensors")
    assert res.exit_code == 1 and "--force" in res.output
    res = run("extract", base, tuned, "-r", 2, "--rank-mode", "fro:3", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and "fro:3" in res.output
    res = run("extract", base, tuned, "-r", 2, "--include", "nothing-matches", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and "nothing to extract" in res.output


def test_exact_svd_dynamic_rank_and_dtype_options(generic_pair, tmp_path):
    base, tuned = generic_pair
    res = run("extract", base, tuned, "-r", 8, "--arch", "generic", "--svd", "exact", "--rank-mode", "fro:0.999",
              "--dtype", "bf16", "--to", "peft", "-o", tmp_path / "e", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {m["rank"] for m in data["modules"]} == {2} and {m["method"] for m in data["modules"]} == {"exact"}
    adapter = read_adapter(tmp_path / "e")
    assert {m.down.dtype for m in adapter.modules.values()} == {torch.bfloat16}


def test_the_cli_plans_once(generic_pair, sd1_pair, tmp_path, monkeypatch):
    """Choosing the output layout needs the plan; the extraction reuses it instead of planning again."""
    import loratool.ops.extract as ops_extract
    import loratool.ops.extract_plan as ops_plan

    calls = []
    real = ops_plan.build_plan

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ops_plan, "build_plan", counting)
    monkeypatch.setattr(ops_extract, "build_plan", counting)
    for pair, name in ((generic_pair, "g"), (sd1_pair, "s.safetensors")):
        calls.clear()
        res = run("extract", *pair, "-r", 2, "-o", tmp_path / name, "-q")
        assert res.exit_code == 0, res.output
        assert len(calls) == 1
    calls.clear()
    assert run("extract", *sd1_pair, "-r", 2, "--arch", "sd1", "-o", tmp_path / "x.safetensors", "-q").exit_code == 0
    assert len(calls) == 1


def _content(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_kohya_output_is_streamed_and_holds_what_the_whole_write_would(sd1_pair, tmp_path, monkeypatch):
    """The kohya file is written while the modules are made: the same tensors and metadata as writing the
    finished adapter whole (the data region in another order, so its own sshs_model_hash), hashes right."""
    from loratool.formats import stream
    from loratool.io.hashes import hash_report

    args = ("extract", *sd1_pair, "-r", 4, "--targets", "attn+conv", "--conv-rank", 3, "--json")
    res = run(*args, "-o", tmp_path / "streamed.safetensors")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["profile"]["streamed"] is True
    monkeypatch.setattr(stream, "streams", lambda fmt: False)
    res = run(*args, "-o", tmp_path / "whole.safetensors")
    assert "streamed" not in json.loads(res.output)["profile"]
    (ta, ma), (tb, mb) = _content(tmp_path / "streamed.safetensors"), _content(tmp_path / "whole.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ma.pop("sshs_model_hash"), mb.pop("sshs_model_hash")
    assert ma == mb
    assert all(v["ok"] for v in hash_report(tmp_path / "streamed.safetensors").values())


def test_a_failure_after_streaming_began_leaves_nothing(sd1_pair, tmp_path, monkeypatch):
    """The output file is open from the first module: a later error (a NaN in TUNED) still leaves no output and
    no temporary, and names the input."""
    from safetensors.torch import save_file

    base, tuned = sd1_pair
    with SafetensorsFile(tuned) as f:
        weights = {k: f.get(k) for k in f.keys()}
    weights[CONV] = weights[CONV].clone()
    weights[CONV][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(weights, str(bad))  # our writer refuses a NaN, as it should
    from loratool.formats.stream import AdapterStream

    added = []
    real_add = AdapterStream.add
    monkeypatch.setattr(AdapterStream, "add", lambda self, ms: (added.extend(m.key for m in ms), real_add(self, ms))[1])
    out = tmp_path / "out"
    out.mkdir()
    res = CliRunner().invoke(cli, ["extract", str(base), str(bad), "-r", "4", "--targets", "attn+conv",
                                   "-o", str(out / "lora.safetensors"), "-q"])
    assert res.exit_code != 0 and "NaN" in res.output and "bad.safetensors" in res.output
    assert added and all("in_layers" not in key for key in added)  # modules were streamed before the failure
    assert list(out.iterdir()) == []


def test_the_streamed_kohya_file_is_the_same_bytes_on_every_run(sd1_pair, tmp_path):
    """Tensors go to the file in the order they lie in memory, storages in the order they come: the same on
    every run (addresses are not), so a rerun gives the same file."""
    args = ("extract", *sd1_pair, "-r", 4, "--targets", "attn+conv", "--conv-rank", 3, "-q")
    for name in ("a", "b"):
        assert run(*args, "-o", tmp_path / f"{name}.safetensors").exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
