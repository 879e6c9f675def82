"""`loratool inspect` through click's CliRunner on hand-made kohya files (values worked out by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.io.hashes import model_hash
from loratool.io.writer import write_safetensors

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 320x320
K = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"  # 1280x768
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # 768x768
SCHEMA = {"path", "format", "base_model", "kinds", "modules", "components", "ranks", "alphas", "dtypes", "params",
          "size_bytes", "reduction_ratio", "unknown_keys", "metadata", "hash_ok"}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}
    for key, (out, inp), rank, alpha in ((Q, (320, 320), 8, 4.0), (K, (1280, 768), 8, 4.0), (TE, (768, 768), 4, 1.0)):
        t[f"{key}.lora_down.weight"] = torch.randn(rank, inp, generator=g).half()
        t[f"{key}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.01).half()
        t[f"{key}.alpha"] = torch.tensor(alpha).half()
    return t


TAGS = {"10_cat": {"cat": 10, "sofa": 3, "window": 7}, "5_dog": {"cat": 2, "dog": 5}}


def make_file(path: Path, *, good_hash: bool = True, extra_key: bool = False) -> Path:
    tensors = _tensors()
    if extra_key:
        tensors["something_else.weight"] = torch.zeros(3)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
            "ss_base_model_version": "sd_v1", "ss_training_started_at": "1680716500.77",
            "ss_training_finished_at": "1680721307.24", "ss_tag_frequency": json.dumps(TAGS),
            "modelspec.title": "hand made", "modelspec.architecture": "stable-diffusion-v1/lora",
            "sshs_model_hash": model_hash(tensors) if good_hash else "0" * 64}
    write_safetensors(path, tensors, meta)
    return path


@pytest.fixture
def lora(tmp_path) -> Path:
    return make_file(tmp_path / "hand.safetensors")


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_json_values_by_hand(lora):
    res = run("inspect", "--json", str(lora))
    assert res.exit_code == 0, res.output
    [rep] = json.loads(res.stdout)
    assert SCHEMA <= set(rep)
    assert rep["path"] == str(lora) and rep["size_bytes"] == lora.stat().st_size
    assert rep["base_model"] == "sd1" and rep["kinds"] == ["lora"]
    assert rep["modules"] == 3 and rep["components"] == {"text_encoder": 1, "unet": 2}
    assert rep["ranks"] == [4, 8] and rep["rank_histogram"] == {"4": 1, "8": 2}
    assert rep["alphas"] == [1, 4] and rep["scales"] == [0.25, 0.5]
    assert rep["dtypes"] == {"F16": 9}
    # 8·(320+320) + 8·(768+1280) + 4·(768+768) = 5 120 + 16 384 + 6 144 = 27 648
    assert rep["params"] == 27_648
    # 320·320 + 1280·768 + 768·768 = 102 400 + 983 040 + 589 824 = 1 675 264
    assert rep["full_params"] == 1_675_264
    assert rep["reduction_ratio"] == pytest.approx(1_675_264 / 27_648)
    assert rep["unknown_keys"] == [] and rep["hash_ok"] is True and rep["empty"] is False
    meta = rep["metadata"]
    assert meta["network"]["dim"] == "8" and meta["network"]["module"] == "networks.lora"
    assert meta["training"]["started_at"] == "2023-04-05T17:41:40+00:00"
    assert meta["top_tags"] == [["cat", 12], ["window", 7], ["dog", 5], ["sofa", 3]]  # summed over both folders
    assert meta["modelspec"]["title"] == "hand made"
    assert "module_details" not in rep


def test_wrong_hash_and_no_hash(tmp_path):
    f = make_file(tmp_path / "bad_hash.safetensors", good_hash=False)
    [rep] = json.loads(run("inspect", "--json", str(f)).stdout)
    assert rep["hash_ok"] is False and rep["hash_checked"] is True
    [rep] = json.loads(run("inspect", "--json", "--no-hash", str(f)).stdout)
    assert rep["hash_ok"] is None and rep["hash_checked"] is False
    text = " ".join(run("inspect", str(f)).stdout.split())
    # what it means and whether the file is still usable, not just "wrong"
    assert "does not match the data" in text and "still usable" in text and "--to kohya -o fixed" in text


def test_a_hash_of_no_bytes_is_explained(real_dir):
    """ai-toolkit stores the SHA-256 of an empty stream: said as such."""
    f = real_dir / "adapters" / "flux_aitoolkit_peft_r16.safetensors"
    text = " ".join(run("inspect", str(f)).stdout.split())
    assert "SHA-256 of no data at all" in text and "still usable" in text and "--to aitoolkit" in text


def test_hash_auto_skips_large_files(tmp_path, monkeypatch):
    import loratool.ops.inspect as ops

    f = make_file(tmp_path / "big.safetensors", good_hash=False)
    monkeypatch.setattr(ops, "HASH_AUTO_LIMIT", f.stat().st_size - 1)  # "large": over the limit
    [rep] = json.loads(run("inspect", "--json", str(f)).stdout)
    assert rep["hash_ok"] is None and rep["hash_checked"] is False
    assert "not checked" in run("inspect", str(f)).stdout
    [rep] = json.loads(run("inspect", "--json", "--hash", str(f)).stdout)
    assert rep["hash_ok"] is False and rep["hash_checked"] is True


def test_modules_norms_match_dense(lora):
    from loratool.io.safetensors import load_file

    res = run("inspect", "--json", "--modules", str(lora))
    [rep] = json.loads(res.stdout)
    rows = {r["key"]: r for r in rep["module_details"]}
    t = load_file(lora)
    ref = {}
    for key, comp_key in ((Q, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
                          (K, "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
                          (TE, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj")):
        up, down = t[f"{key}.lora_up.weight"].double(), t[f"{key}.lora_down.weight"].double()
        scale = float(t[f"{key}.alpha"]) / down.shape[0]
        ref[comp_key] = float((scale * up @ down).norm())
    assert set(rows) == set(ref)
    for k, v in ref.items():
        assert rows[k]["delta_norm"] == pytest.approx(v, rel=1e-5)
    assert rows["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]["shape"] == [1280, 768]
    assert set(rep["blocks"]) == {"unet:down_blocks.0", "unet:mid_block", "text_encoder:layers.0"}
    text = run("inspect", "--modules", str(lora)).stdout
    assert "‖ΔW‖_F" in text and "attn2.to_k" in text


def test_text_summary(lora):
    res = run("inspect", str(lora))
    assert res.exit_code == 0
    out = res.stdout
    for needle in ("base model: sd1", "4 ×1, 8 ×2", "27,648", "networks.lora", "cat (12)",
                   "sshs_model_hash matches", "modelspec.title", "rank histogram"):
        assert needle in out, needle


def test_unknown_keys_are_listed(tmp_path):
    f = make_file(tmp_path / "extra.safetensors", extra_key=True)
    [rep] = json.loads(run("inspect", "--json", str(f)).stdout)
    assert rep["unknown_keys"] == ["something_else.weight"] and rep["modules"] == 3


def test_several_files_good_reported_bad_one_line_exit_1(lora, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\r\n")
    res = run("inspect", "--json", str(lora), str(bad), str(lora))
    assert res.exit_code == 1
    reps = json.loads(res.stdout)
    assert [r["path"] for r in reps] == [str(lora), str(lora)]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"loratool: error: {bad}: ")


def test_missing_file_is_one_line(tmp_path):
    res = run("inspect", str(tmp_path / "nope.safetensors"))
    assert res.exit_code == 1
    assert res.stderr.strip() == f"loratool: error: {tmp_path / 'nope.safetensors'}: no such file"
    assert res.stdout == ""


def test_plot(lora, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    png = tmp_path / "p.png"
    res = run("inspect", "--plot", str(png), str(lora))
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(lora, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    res = run("inspect", "--plot", str(tmp_path / "p.png"), str(lora))
    assert res.exit_code == 1
    assert "pip install 'loratool[plot]'" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_safetensors_renamed_to_bin_is_read_as_safetensors(lora, tmp_path):
    renamed = tmp_path / "renamed.bin"
    renamed.write_bytes(lora.read_bytes())
    [rep] = json.loads(run("inspect", "--json", str(renamed)).stdout)
    assert rep["container"] == "safetensors" and rep["dtypes"] == {"F16": 9} and rep["hash_ok"] is True
    assert rep["modules"] == 3


def test_peft_folder(tmp_path):
    from loratool.io.writer import write_safetensors

    g = torch.Generator().manual_seed(3)
    t = {}
    for i in range(2):
        t[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(8, 64, generator=g)
        t[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(64, 8, generator=g)
    write_safetensors(tmp_path / "adapter_model.safetensors", t, None, hashes=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                              "target_modules": ["q_proj"]}))
    [rep] = json.loads(run("inspect", "--json", str(tmp_path)).stdout)
    assert rep["container"] == "folder" and rep["modules"] == 2 and rep["alphas"] == [16] and rep["scales"] == [2]
    # 2 · 8·(64+64) = 2048 LoRA parameters for 2 · 64·64 = 8192 weights
    assert (rep["params"], rep["full_params"], rep["reduction_ratio"]) == (2048, 8192, 4.0)
    assert rep["dtypes"] == {"F32": 4}
    assert rep["hash_ok"] is True  # the folder's tensor file carries the hash, and it is checked


def test_without_modules_no_tensor_values_are_read_but_scalars(lora, monkeypatch):
    """Every non-scalar tensor handed out becomes a meta tensor (a shape and a dtype, no data):
    the report must come out the same, so nothing but the alpha scalars was looked at."""
    from loratool.io.safetensors import SafetensorsFile
    from loratool.ops.inspect import inspect_file

    expected = inspect_file(lora, check_hash=False)
    real_get = SafetensorsFile.get

    def shape_only(self, key):
        t = real_get(self, key)
        return t if t.numel() <= 1 else torch.empty(t.shape, dtype=t.dtype, device="meta")

    monkeypatch.setattr(SafetensorsFile, "get", shape_only)
    assert inspect_file(lora, check_hash=False) == expected
    with pytest.raises((NotImplementedError, RuntimeError)):  # --modules does need the values
        inspect_file(lora, modules=True, check_hash=False)


def test_group_help_shows_the_example_once():
    out = " ".join(CliRunner().invoke(cli, ["--help"]).stdout.split())
    assert out.count("loratool inspect my_lora.safetensors") == 1
