"""Standard metadata builders, finalisation before a write, and kohya metadata for display."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from loratool.errors import LoraToolError
from loratool.io.hashes import check_hash
from loratool.io.metadata import (
    BASE_MODELS,
    decode_json,
    describe_metadata,
    finalize_metadata,
    iso_date,
    loratool_keys,
    modelspec,
    ss_minimal,
    tag_counts,
    top_tags,
)
from loratool.io.writer import write_safetensors


def test_ss_minimal_sdxl_and_flux() -> None:
    m = ss_minimal("sdxl", 32, 16, network_args={"conv_dim": 8, "conv_alpha": 4.0})
    assert m == {
        "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "32",
        "ss_network_alpha": "16.0",
        "ss_network_args": '{"conv_dim": "8", "conv_alpha": "4.0"}',
    }
    f = ss_minimal("flux", 16, None)
    assert f["ss_base_model_version"] == "flux1" and f["ss_network_module"] == "networks.lora_flux"
    assert f["ss_network_alpha"] == "16.0"  # no alpha = alpha equal to dim (scale 1)
    assert ss_minimal("sd2", 4, 4, v_prediction=True)["ss_base_model_version"] == "sd_v2_v"
    assert ss_minimal("sd2", 4, 4)["ss_v2"] == "True"
    assert ss_minimal("sd1", "Dynamic", "Dynamic")["ss_network_alpha"] == "Dynamic"
    for base in BASE_MODELS:
        assert all(isinstance(v, str) for v in ss_minimal(base, 4, 1.5).values())


def test_unknown_base_model_is_one_line_error() -> None:
    with pytest.raises(LoraToolError, match="unknown base model 'sd9'"):
        ss_minimal("sd9", 4, 4)


@pytest.mark.parametrize(
    "base, arch, impl, res, pred",
    [
        ("sd1", "stable-diffusion-v1/lora", "diffusers", "512x512", "epsilon"),
        ("sd2", "stable-diffusion-v2-512/lora", "diffusers", "512x512", "epsilon"),
        ("sdxl", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
         "1024x1024", "epsilon"),
        ("flux", "flux-1-dev/lora", "https://github.com/black-forest-labs/flux", "1024x1024", None),
        ("sd3", "stable-diffusion-3-medium/lora", None, "1024x1024", "epsilon"),
    ],
)
def test_modelspec(base, arch, impl, res, pred) -> None:
    m = modelspec(base, "my_lora", date="2025-01-02T03:04:05")
    assert m["modelspec.sai_model_spec"] == "1.0.1"
    assert m["modelspec.architecture"] == arch
    if impl is not None:
        assert m["modelspec.implementation"] == impl
    assert m["modelspec.resolution"] == res and m["modelspec.title"] == "my_lora"
    assert m["modelspec.date"] == "2025-01-02T03:04:05"
    assert m.get("modelspec.prediction_type") == pred


def test_modelspec_v_prediction_sd2() -> None:
    m = modelspec("sd2", "t", date="x", v_prediction=True)
    assert m["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert m["modelspec.resolution"] == "768x768" and m["modelspec.prediction_type"] == "v"
    assert modelspec("sdxl", "t", date="x", lora=False)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_iso_date_reproducible(monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1680716500")
    assert iso_date() == "2023-04-05T17:41:40"
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    d = iso_date()
    assert len(d) == 19 and d[10] == "T" and "." not in d


def test_loratool_keys() -> None:
    from loratool import __version__

    k = loratool_keys("extract", {"rank": 8, "base": "a.safetensors", "clamp": None})
    assert k["loratool.version"] == __version__ and k["loratool.command"] == "extract"
    assert json.loads(k["loratool.parameters"]) == {"base": "a.safetensors", "clamp": None, "rank": 8}


def test_finalize_metadata_sets_right_hashes(tmp_path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    stale = {"ss_network_dim": "4", "sshs_model_hash": "e3b0c442" * 8, "sshs_legacy_hash": "deadbeef"}
    meta = finalize_metadata(tensors, stale)
    data = tensors["a"].numpy().tobytes() + tensors["b"].numpy().tobytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["sshs_legacy_hash"] == "e3b0c442"  # file far under 1 MiB
    assert meta["ss_network_dim"] == "4" and list(meta) == sorted(meta)
    out = write_safetensors(tmp_path / "x.safetensors", tensors, meta)
    assert check_hash(out) is True
    with pytest.raises(LoraToolError, match="must map a string to a string"):
        finalize_metadata(tensors, {"ss_network_dim": 4})  # type: ignore[dict-item]


KOHYA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "16",
    "ss_network_alpha": "8.0",
    "ss_network_args": '{"conv_dim": "4"}',
    "ss_training_started_at": "1680716500.7709305",
    "ss_training_finished_at": "None",
    "ss_tag_frequency": json.dumps({"10_a": {"cat": 3, "dog": 1, " hat": 2}, "5_b": {"cat": 1, "hat": 2, "x": "y"}}),
    "modelspec.title": "T",
    "ss_clip_skip": "None",
}


def test_describe_kohya_metadata() -> None:
    d = describe_metadata(KOHYA, top=2)
    assert d["network"] == {"module": "networks.lora", "dim": "16", "alpha": "8.0", "args": {"conv_dim": "4"}}
    assert d["training"]["started_at"] == "2023-04-05T17:41:40+00:00"
    assert "finished_at" not in d["training"]
    assert d["top_tags"] == [("cat", 4), ("hat", 4)]
    assert d["modelspec"] == {"title": "T"}
    json.dumps(d)  # serialisable as it is


def test_tag_counts_from_ss_datasets() -> None:
    meta = {"ss_datasets": json.dumps([{"tag_frequency": {"d1": {"a": 2}}}, {"tag_frequency": {"d2": {"a": 1, "b": 5}}},
                                       "junk"])}
    assert tag_counts(meta) == {"a": 3, "b": 5}
    assert top_tags(meta, 1) == [("b", 5)]


@pytest.mark.parametrize("value", [None, "", "None", "{not json", "[" * 100_000, '"just a string"'])
def test_bad_json_values_never_raise(value) -> None:
    decoded = decode_json(value)
    assert decoded is None or isinstance(decoded, str)
    meta = {"ss_tag_frequency": value, "ss_datasets": value, "ss_network_args": value,
            "ss_training_started_at": value}
    meta = {k: v for k, v in meta.items() if v is not None}
    d = describe_metadata(meta)
    assert d["top_tags"] == [] and "started_at" not in d["training"]


def test_describe_real_kohya_file(real_dir) -> None:
    from loratool.io.safetensors import read_metadata

    meta = read_metadata(real_dir / "adapters" / "sd15_kohya_lycoris_lokr_r4.safetensors")
    d = describe_metadata(meta)
    assert d["network"]["args"] == {"conv_rank": "4", "conv_alpha": "4", "algo": "lokr"}
    assert d["training"]["started_at"] == "2023-04-05T17:41:40+00:00"
    assert d["training"]["finished_at"] == "2023-04-05T19:01:47+00:00"
    tags = dict(d["top_tags"])
    assert len(d["top_tags"]) == 10 and tags["hair bow"] == 129
    # independent recount of one tag over the three dataset folders
    freq = json.loads(meta["ss_tag_frequency"])
    assert tags["hair bow"] == sum(folder.get("hair bow", 0) for folder in freq.values())
