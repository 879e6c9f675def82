"""Every file in ../shared/fixtures/real/bad/ gets, at the io level, the behaviour MANIFEST.md asks
for: a one-line error naming the file and what is wrong, or a safe read. (The CLI-level test lives
elsewhere and reuses these messages.)"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from loratool.errors import LoraToolError, SafetensorsError
from loratool.io.hashes import check_hash
from loratool.io.pickles import read_pickle
from loratool.io.safetensors import SafetensorsFile
from loratool.io.sources import open_source

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def bad(real_dir) -> Path:
    return real_dir / "bad"


def _one_line_error(path: Path, exc_type=LoraToolError) -> str:
    """The same error comes from the raw reader and from open_source; one line, path first."""
    messages = []
    for opener in (SafetensorsFile, open_source):
        with pytest.raises(exc_type) as e:
            opener(path)
        text = str(e.value)
        assert "\n" not in text and text.startswith(f"{path}: "), text
        messages.append(text)
    assert messages[0] == messages[1]
    return messages[0]


def test_every_bad_file_is_covered(bad) -> None:
    assert sorted(p.name for p in bad.iterdir()) == sorted([
        "two_bytes.safetensors", "sdxl_truncated_upload.safetensors", "json_not_safetensors.safetensors",
        "empty_valid.safetensors", "sd15_malformed_hand_converted.safetensors", "sd15_diffusers_pickle.bin"])


def test_two_bytes(bad) -> None:
    msg = _one_line_error(bad / "two_bytes.safetensors", SafetensorsError)
    assert "not a safetensors file" in msg and "too small (2 bytes)" in msg


def test_truncated_upload_says_n_of_m(bad) -> None:
    path = bad / "sdxl_truncated_upload.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    promised = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    present = len(raw) - 8 - n
    assert promised > 20_000_000 and present < promised  # what the manifest says: ~23 MB promised
    msg = _one_line_error(path, SafetensorsError)
    assert f"truncated: {present} of {promised} bytes" in msg


def test_json_file_named_safetensors(bad) -> None:
    msg = _one_line_error(bad / "json_not_safetensors.safetensors", SafetensorsError)
    assert "not a safetensors file" in msg and "JSON" in msg


def test_empty_but_valid(bad) -> None:
    path = bad / "empty_valid.safetensors"
    with SafetensorsFile(path) as f:
        assert len(f) == 0 and f.keys() == [] and f.metadata == {}
    with open_source(path) as s:
        assert s.kind == "safetensors" and len(s) == 0
    assert check_hash(path) is None


def test_malformed_conversion_reads_every_key(bad) -> None:
    """A valid container: the io layer hands every key over (formats reports the unknown ones)."""
    path = bad / "sd15_malformed_hand_converted.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    expected = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
    with open_source(path) as s:
        assert s.keys() == expected and len(expected) == 256
        assert all("lora_unet_unet_" in k for k in expected if k.startswith("lora_unet"))
        for k in expected[:4]:
            t = s.get(k)
            assert tuple(t.shape) == s.shape(k) and torch.isfinite(t).all()


def test_pickle_is_read_weights_only_or_refused_as_safetensors(bad, monkeypatch) -> None:
    path = bad / "sd15_diffusers_pickle.bin"
    msg = _one_line_error_safetensors_reader(path)
    assert "zip archive" in msg
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (seen.append(k), real_load(*a, **k))[1])
    with open_source(path) as s:
        assert s.kind == "pickle" and len(s) == 256
    c = read_pickle(path)
    assert len(c.tensors) == 256
    assert seen and all(k.get("weights_only") is True for k in seen)


def _one_line_error_safetensors_reader(path: Path) -> str:
    with pytest.raises(SafetensorsError) as e:
        SafetensorsFile(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and "not a safetensors file" in text
    return text
