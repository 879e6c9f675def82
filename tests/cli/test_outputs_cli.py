"""Every command's outputs go through the one writer: refused before any work when they would hit an
input, an existing file without --force, or another output of the same command; folders are replaced
as a whole."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.core.modules import Adapter, LoraModule
from loratool.formats import read_adapter, write_adapter
from loratool.formats.special import _te_order
from loratool.io.writer import write_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from cli_checks import one_error  # noqa: E402  (the CLI tests' one-error-line check, shared with tests/train)

REPO = Path(__file__).resolve().parents[2]
UNET = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _lora(tmp_path: Path, name: str, keys=(UNET, TE), seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    a = Adapter(base_model="sd1")
    for key in keys:
        comp, path = key.split(".", 1)
        width = 320 if comp == "unet" else 768
        a.add(LoraModule(comp, path, alpha=4.0, down=torch.randn(4, width, generator=g),
                         up=torch.randn(width, 4, generator=g)))
    out = tmp_path / name
    write_adapter(a, out, "kohya")
    return out


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if an op starts: claims must refuse before any work."""
    import loratool.ops.extract
    import loratool.ops.resize

    def forbidden(*_a, **_k):
        raise AssertionError("the work started before the outputs were checked")

    monkeypatch.setattr(loratool.ops.resize, "resize", forbidden)
    monkeypatch.setattr(loratool.ops.extract, "extract", forbidden)


def test_a_report_over_the_output_is_refused_before_any_work(tmp_path, no_work):
    src = _lora(tmp_path, "in.safetensors")
    out = tmp_path / "small.safetensors"
    one_error(run("resize", src, "-r", 2, "-o", out, "--report", out, "--force"),
              "the report and the adapter would be written to the same path")
    assert not out.exists()


def test_an_existing_report_needs_force(tmp_path, no_work):
    src = _lora(tmp_path, "in.safetensors")
    report, out = tmp_path / "report.json", tmp_path / "small.safetensors"
    report.write_text("keep")
    one_error(run("resize", src, "-r", 2, "-o", out, "--report", report), str(report), "use --force")
    assert report.read_text() == "keep" and not out.exists()


def test_report_written_with_force(tmp_path):
    src = _lora(tmp_path, "in.safetensors")
    report, out = tmp_path / "report.json", tmp_path / "small.safetensors"
    report.write_text("old")
    res = run("resize", src, "-r", 2, "-o", out, "--report", report, "--force", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(report.read_text())["output"] == str(out) and read_adapter(out).modules


def test_extract_checks_a_peft_folder_output_before_extracting(tmp_path, no_work):
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(16, 8, generator=g)}
    write_safetensors(tmp_path / "b.safetensors", base)
    write_safetensors(tmp_path / "t.safetensors", {"a.weight": base["a.weight"] + 0.1})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    one_error(run("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--arch", "generic",
                  "--to", "peft", "-r", 2, "-o", tmp_path / "out"), "use --force")
    assert _files(tmp_path / "out") == ["keep.txt"]


def test_a_peft_folder_is_replaced_as_a_whole(tmp_path):
    both = _lora(tmp_path, "both.safetensors")
    unet_only = _lora(tmp_path, "unet.safetensors", keys=(UNET,), seed=1)
    out = tmp_path / "peft"
    assert run("convert", both, "--to", "peft", "-o", out).exit_code == 0
    assert "text_encoder/adapter_model.safetensors" in _files(out)
    one_error(run("convert", unet_only, "--to", "peft", "-o", out), "use --force")
    res = run("convert", unet_only, "--to", "peft", "-o", out, "--force")
    assert res.exit_code == 0, res.output
    assert _files(out) == ["adapter_config.json", "adapter_model.safetensors"]  # no stale text_encoder/
    got, want = read_adapter(out), read_adapter(unet_only)
    assert sorted(got.modules) == [UNET] and torch.equal(got.modules[UNET].down, want.modules[UNET].down)
    assert not [p for p in tmp_path.iterdir() if "loratool-tmp" in p.name]


def _cloneofsimo_with_tokens(path: Path, tokens: list[str]) -> Path:
    g = torch.Generator().manual_seed(0)
    order = _te_order(["CLIPAttention"])
    tensors = {}
    for i, (_, (out, inp)) in enumerate(order[:2]):
        tensors[f"text_encoder:{i}:up"] = torch.randn(out, 1, generator=g)
        tensors[f"text_encoder:{i}:down"] = torch.randn(1, inp, generator=g)
    for t in tokens:
        tensors[t] = torch.randn(768, generator=g)
    write_safetensors(path, tensors, {t: "<embed>" for t in tokens})
    return path


def test_token_files_that_share_a_name_are_refused_before_writing(tmp_path):
    src = _cloneofsimo_with_tokens(tmp_path / "pivotal.safetensors", ["<s1>", "s1"])
    out = tmp_path / "out.safetensors"
    one_error(run("convert", src, "--to", "kohya", "-o", out), "out.s1.safetensors",
              "the embedding of s1 and the embedding of <s1> would be written to the same path")
    assert _files(tmp_path) == ["pivotal.safetensors"]
    ok = _cloneofsimo_with_tokens(tmp_path / "two.safetensors", ["<s1>", "<s2>"])
    res = run("convert", ok, "--to", "kohya", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    files = json.loads(res.output)["embedding_files"]
    assert sorted(Path(p).name for p in files.values()) == ["out.s1.safetensors", "out.s2.safetensors"]


def test_a_plot_over_an_input_or_an_existing_file(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    lora = _lora(tmp_path, "in.safetensors")
    before = lora.read_bytes()
    one_error(run("inspect", "--plot", lora, lora), "refusing to overwrite an input")
    assert lora.read_bytes() == before
    png = tmp_path / "p.png"
    png.write_bytes(b"mine")
    one_error(run("inspect", "--plot", png, lora), "use --force")
    one_error(run("ratio", "--model", "sd15", "-r", 4, "--plot", png), "use --force")
    assert png.read_bytes() == b"mine"
    assert run("inspect", "--plot", png, lora, "--force").exit_code == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_merge_never_writes_over_a_lora_input(tmp_path):
    lora = _lora(tmp_path, "in.safetensors")
    ckpt = tmp_path / "model.safetensors"
    write_safetensors(ckpt, {"x.weight": torch.zeros(2, 2)})
    before = lora.read_bytes()
    one_error(run("merge", ckpt, f"{lora}:0.5", "-o", lora, "--force", "--arch", "generic"),
              "refusing to overwrite an input")
    assert lora.read_bytes() == before


def _train(*args):
    base = ["train", "--model", REPO / "fixtures" / "tiny-sd", "--instance-data", REPO / "fixtures" / "tiny-instance",
            "--instance-prompt", "a sks shape", "--resolution", "16", "-r", "4", "--steps", "1"]
    return run(*base, *args)


def test_train_refuses_a_used_output_folder_without_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"an earlier run")
    one_error(_train("-o", out), str(out), "use --force")
    assert _files(out) == ["lora.safetensors"]


def test_train_never_writes_over_the_checkpoint_it_resumes_from(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-final").mkdir(parents=True)
    (out / "checkpoint-final" / "adapter.safetensors").write_bytes(b"resume from me")
    one_error(_train("-o", out, "--force", "--resume", out / "checkpoint-final"),
              "checkpoint-final", "refusing to overwrite an input")
    assert _files(out) == ["checkpoint-final", "checkpoint-final/adapter.safetensors"]
