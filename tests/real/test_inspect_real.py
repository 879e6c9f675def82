"""`loratool inspect --json` on every real file in ../shared/fixtures/real (skipped when absent).

Expected values are written out here, from the files themselves (tensor names and shapes, see
MANIFEST.md), not from what our reader returns.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from loratool.cli.main import cli

pytestmark = pytest.mark.real

# file -> (format, base model, modules, components, rank histogram, stored dtypes)
ADAPTERS = {
    # 16 transformer blocks × attn1/attn2 × q/k/v/out, rank 4, F32
    "sd15_diffusers_attnprocs.safetensors":
        ("diffusers-attnproc", "sd1", 128, {"unet": 128}, {"4": 128}, {"F32": 256}),
    "sd15_diffusers_attnprocs_unet_prefix.safetensors":
        ("diffusers-attnproc", "sd1", 128, {"unet": 128}, {"4": 128}, {"F32": 256}),
    "sd15_diffusers_lora_down_up.safetensors":
        ("diffusers-old", "sd1", 128, {"unet": 128}, {"4": 128}, {"F32": 256}),
    "sd2_diffusers_attnprocs_unet_prefix.safetensors":
        ("diffusers-attnproc", "sd2", 128, {"unet": 128}, {"4": 128}, {"F32": 256}),
    "sd2_diffusers_lora_down_up.safetensors":
        ("diffusers-old", "sd2", 128, {"unet": 128}, {"4": 128}, {"F32": 256}),
    "sd2_diffusers_bf16.safetensors":
        ("diffusers-old", "sd2", 128, {"unet": 128}, {"4": 128}, {"BF16": 256}),
    # kohya's LoCon set: 72 text-encoder + 278 U-Net modules, 5 tensors each (w1_a/b, w2_a/b, alpha)
    "sd15_kohya_lycoris_lokr_r4.safetensors":
        ("kohya", "sd1", 350, {"text_encoder": 72, "unet": 278}, {"4": 350}, {"F16": 1750}),
    # 4 × single_transformer_blocks.N.proj_out (3072 × 15360), rank 16
    "flux_aitoolkit_peft_r16.safetensors":
        ("aitoolkit", "flux", 4, {"transformer": 4}, {"16": 4}, {"F16": 8}),
    # CrossAttention q/k/v/out + GEGLU proj in 16 blocks (144), CLIPAttention in 12 layers (48), rank 1
    "sd15_cloneofsimo_safeloras.safetensors":
        ("cloneofsimo", "sd1", 192, {"text_encoder": 48, "unet": 144}, {"1": 192}, {"F32": 386}),
}

SCHEMA = {"path", "format", "base_model", "kinds", "modules", "components", "ranks", "alphas", "dtypes", "params",
          "size_bytes", "reduction_ratio", "unknown_keys", "metadata", "hash_ok"}


def run(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args])


@pytest.fixture(scope="module")
def reports(real_dir) -> dict[str, dict]:
    files = [str(real_dir / "adapters" / name) for name in ADAPTERS]
    res = run("--json", *files)
    assert res.exit_code == 0, res.stderr
    reps = json.loads(res.stdout)
    assert [r["path"] for r in reps] == files
    return {r["path"].rsplit("/", 1)[-1]: r for r in reps}


def test_every_real_adapter_is_in_the_table(real_dir):
    assert {p.name for p in (real_dir / "adapters").iterdir()} == set(ADAPTERS)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_real_adapter(reports, real_dir, name):
    fmt, base, n, comps, hist, dtypes = ADAPTERS[name]
    rep = reports[name]
    assert SCHEMA <= set(rep)
    assert (rep["format"], rep["base_model"], rep["modules"]) == (fmt, base, n)
    assert rep["components"] == comps and rep["rank_histogram"] == hist and rep["dtypes"] == dtypes
    assert rep["ranks"] == [int(r) for r in hist]
    assert rep["unknown_keys"] == [] and rep["size_bytes"] == (real_dir / "adapters" / name).stat().st_size
    assert rep["params"] > 0 and rep["reduction_ratio"] > 1


def test_real_details(reports):
    lokr = reports["sd15_kohya_lycoris_lokr_r4.safetensors"]
    assert lokr["kinds"] == ["lokr"] and lokr["alphas"] == [4] and lokr["conv_modules"] == 96
    assert lokr["hash_ok"] is True  # kohya wrote the right sshs_model_hash
    meta = lokr["metadata"]
    assert meta["network"]["module"] == "lycoris.kohya" and meta["network"]["args"]["algo"] == "lokr"
    assert meta["training"]["started_at"].startswith("2023-04-05T17:41:40")
    assert meta["top_tags"][0] == ["smart falcon \\(umamusume\\)", 130] and len(meta["top_tags"]) == 10
    assert meta["keys"] == 61
    flux = reports["flux_aitoolkit_peft_r16.safetensors"]
    # ai-toolkit stored sha256 of empty data (e3b0c442…): wrong (reference/kohya.md §5.4)
    assert flux["hash_ok"] is False
    # its ss_base_model_version wrongly says sd_1.5 (MANIFEST.md); the keys say flux
    assert flux["metadata_base_model"] == "sd1" and flux["base_model"] == "flux"
    assert lokr["metadata_base_model"] is None  # 2023 kohya: only ss_v2, no ss_base_model_version
    # 16·(15360 + 3072) per module, 4 modules
    assert flux["params"] == 4 * 16 * (15360 + 3072)
    clone = reports["sd15_cloneofsimo_safeloras.safetensors"]
    assert clone["embeddings"] == {"<s1>": [1, 768], "<s2>": [1, 768]}
    assert clone["params"] == clone["module_params"] + 2 * 768
    assert "<s1>" in clone["metadata"]["other_keys"] and len(clone["metadata"]["other_keys"]) == 196
    assert clone["reduction_ratio"] == clone["full_params"] / clone["module_params"]
    # attention-processor files store no alpha: scale 1
    assert reports["sd15_diffusers_attnprocs.safetensors"]["alphas"] == [None]
    assert reports["sd15_diffusers_attnprocs.safetensors"]["scales"] == [1]


def test_top_tags_option(real_dir):
    f = real_dir / "adapters" / "sd15_kohya_lycoris_lokr_r4.safetensors"
    [rep] = json.loads(run("--json", "--top-tags", "15", str(f)).stdout)
    tags = rep["metadata"]["top_tags"]
    assert len(tags) == 15 and [n for _, n in tags] == sorted((n for _, n in tags), reverse=True)


def test_modules_on_a_real_file(real_dir):
    f = real_dir / "adapters" / "sd2_diffusers_bf16.safetensors"
    [rep] = json.loads(run("--json", "--modules", str(f)).stdout)
    rows = rep["module_details"]
    assert len(rows) == 128 and all(r["dtype"] == "BF16" and r["rank"] == 4 for r in rows)
    assert all(r["delta_norm"] > 0 for r in rows)


# -- bad/ : what MANIFEST.md asks for ----------------------------------------------------------

REFUSED = {
    "two_bytes.safetensors": "too small",
    "sdxl_truncated_upload.safetensors": "truncated",
    "json_not_safetensors.safetensors": "not a safetensors file",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_file_is_one_line_exit_1(real_dir, name):
    f = real_dir / "bad" / name
    res = run(str(f))
    assert res.exit_code == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"loratool: error: {f}: ")
    assert REFUSED[name] in lines[0]


def test_truncated_says_how_much(real_dir):
    res = run(str(real_dir / "bad" / "sdxl_truncated_upload.safetensors"))
    assert " of " in res.stderr and "bytes" in res.stderr


def test_empty_valid_is_inspected_and_said_empty(real_dir):
    f = real_dir / "bad" / "empty_valid.safetensors"
    res = run(str(f))
    assert res.exit_code == 0 and "empty" in res.stdout
    [rep] = json.loads(run("--json", str(f)).stdout)
    assert rep["empty"] is True and rep["modules"] == 0 and rep["params"] == 0 and rep["size_bytes"] == 16


def test_malformed_keys_reported_by_name(real_dir):
    f = real_dir / "bad" / "sd15_malformed_hand_converted.safetensors"
    [rep] = json.loads(run("--json", str(f)).stdout)
    assert rep["modules"] == 0 and len(rep["unknown_keys"]) == 256
    assert "lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k_lora_down.weight" \
        in rep["unknown_keys"]


def test_pickle_read_weights_only(real_dir, monkeypatch):
    import torch

    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    f = real_dir / "bad" / "sd15_diffusers_pickle.bin"
    res = run("--json", str(f))
    assert res.exit_code == 0, res.stderr
    [rep] = json.loads(res.stdout)
    assert rep["container"] == "pickle" and rep["modules"] == 128 and rep["rank_histogram"] == {"4": 128}
    assert calls and all(c is True for c in calls)


def test_all_bad_files_together_exit_1_and_report_the_readable(real_dir):
    files = sorted(str(p) for p in (real_dir / "bad").iterdir())
    res = run("--json", *files)
    assert res.exit_code == 1
    assert len(res.stderr.strip().splitlines()) == len(REFUSED)
    assert len(json.loads(res.stdout)) == len(files) - len(REFUSED)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_real_inspect_reads_no_tensor_values(real_dir, name, monkeypatch):
    """Non-scalar tensors replaced by meta tensors (no data): the report is unchanged."""
    import torch

    from loratool.io.safetensors import SafetensorsFile
    from loratool.ops.inspect import inspect_file

    f = real_dir / "adapters" / name
    expected = inspect_file(f, check_hash=False)
    real_get = SafetensorsFile.get

    def shape_only(self, key):
        t = real_get(self, key)
        return t if t.numel() <= 1 else torch.empty(t.shape, dtype=t.dtype, device="meta")

    monkeypatch.setattr(SafetensorsFile, "get", shape_only)
    assert inspect_file(f, check_hash=False) == expected
