"""sshs_* hashes against independent computations with hashlib over real serialisations."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch
from safetensors.torch import save

from loratool.io.hashes import (
    check_hash,
    file_legacy_hash,
    file_model_hash,
    legacy_hash,
    model_hash,
    tensor_hashes,
)
from loratool.io.metadata import finalize_metadata
from loratool.io.writer import write_safetensors


def _kohya_style(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """What kohya does: save in memory with only ss_* metadata, hash after offset 8+N, and the
    64 KiB at 1 MiB (first 8 hex)."""
    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    b = io.BytesIO(blob)
    b.seek(0x100000)
    return hashlib.sha256(blob[8 + n:]).hexdigest(), hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def _tensors(big: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 700 if big else 20  # 700*512*4 bytes per tensor: the legacy window lies in the data
    return {
        "lora_unet_a.lora_down.weight": torch.randn(n, 512, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(64, 8, generator=g).to(torch.float16),
        "lora_unet_a.alpha": torch.tensor(4.0),
        "lora_te_b.lora_down.weight": torch.randn(n, 300, generator=g).to(torch.bfloat16),
    }


META = {"ss_network_dim": "8", "ss_network_alpha": "4.0", "modelspec.title": "x" * 500, "other": "y"}


@pytest.mark.parametrize("meta", [META, {}, None, {"modelspec.title": "only non-ss keys"}])
@pytest.mark.parametrize("big", [False, True])
def test_tensor_hashes_match_kohya_definition(big: bool, meta) -> None:
    tensors = _tensors(big)
    expected_model, expected_legacy = _kohya_style(tensors, meta or {})
    assert model_hash(tensors) == expected_model
    assert legacy_hash(tensors, meta) == expected_legacy
    assert tensor_hashes(tensors, meta) == {"sshs_model_hash": expected_model, "sshs_legacy_hash": expected_legacy}
    if not big:
        assert expected_legacy == hashlib.sha256(b"").hexdigest()[:8]  # window past the end


def test_legacy_hash_ignores_non_ss_metadata_but_not_ss_metadata() -> None:
    tensors = _tensors(True)
    base = legacy_hash(tensors, {"ss_a": "1"})
    assert legacy_hash(tensors, {"ss_a": "1", "modelspec.title": "z" * 1000}) == base
    assert legacy_hash(tensors, {"ss_a": "1" * 77}) != base  # header length shifts the window


@pytest.mark.parametrize("big", [False, True])
def test_file_hashes_match_hashlib_over_file_bytes(tmp_path, big: bool) -> None:
    tensors = _tensors(big)
    meta = finalize_metadata(tensors, META)
    out = write_safetensors(tmp_path / "a.safetensors", tensors, meta)
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert file_model_hash(out) == hashlib.sha256(raw[8 + n:]).hexdigest() == meta["sshs_model_hash"]
    assert file_legacy_hash(out) == _kohya_style(tensors, META)[1] == meta["sshs_legacy_hash"]
    assert check_hash(out) is True


def test_check_hash_false_none_and_cast(tmp_path) -> None:
    tensors = _tensors(False)
    assert check_hash(write_safetensors(tmp_path / "none.safetensors", tensors, {"a": "b"})) is None
    meta = finalize_metadata(tensors, {})
    half = {k: v.to(torch.float16) for k, v in tensors.items()}
    # hashes of the fp32 tensors do not fit the fp16 file: the cast must come first
    assert check_hash(write_safetensors(tmp_path / "stale.safetensors", half, meta)) is False
    good = write_safetensors(tmp_path / "good.safetensors", half, finalize_metadata(half, meta))
    assert check_hash(good) is True


def test_check_hash_streams_in_chunks(tmp_path, monkeypatch) -> None:
    import loratool.io.hashes as hashes

    monkeypatch.setattr(hashes, "CHUNK", 4096)
    reads: list[int] = []
    tensors = _tensors(True)
    out = write_safetensors(tmp_path / "a.safetensors", tensors, finalize_metadata(tensors, {}))
    real_sha = hashlib.sha256

    class Spy:
        def __init__(self) -> None:
            self.h = real_sha()

        def update(self, b) -> None:
            reads.append(len(b))
            self.h.update(b)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(hashes.hashlib, "sha256", Spy)
    assert check_hash(out) is True
    assert max(reads) <= 4096 and sum(reads) == out.stat().st_size - 8 - int.from_bytes(out.read_bytes()[:8], "little")


def test_real_adapters_stored_hashes(real_dir) -> None:
    ad = real_dir / "adapters"
    lokr = ad / "sd15_kohya_lycoris_lokr_r4.safetensors"
    assert check_hash(lokr) is True  # kohya-written: right
    assert file_legacy_hash(lokr) == "e3b0c442"  # under 1 MiB with ss_* header only: empty window
    # ai-toolkit stored sha256 of empty data (ostris/ai-toolkit #130): wrong
    assert check_hash(ad / "flux_aitoolkit_peft_r16.safetensors") is False
    assert check_hash(ad / "sd15_diffusers_attnprocs.safetensors") is None


def test_hash_report(real_dir, tmp_path) -> None:
    from loratool.io.hashes import hash_report

    r = hash_report(real_dir / "adapters" / "flux_aitoolkit_peft_r16.safetensors")
    assert r["sshs_model_hash"]["ok"] is False and r["sshs_legacy_hash"]["ok"] is False
    assert r["sshs_model_hash"]["stored"] == hashlib.sha256(b"").hexdigest()  # ai-toolkit #130
    tensors = _tensors(True)
    out = write_safetensors(tmp_path / "a.safetensors", tensors, finalize_metadata(tensors, META))
    r = hash_report(out)
    assert r["sshs_model_hash"]["ok"] is True and r["sshs_legacy_hash"]["ok"] is True
    plain = write_safetensors(tmp_path / "b.safetensors", tensors)
    assert hash_report(plain)["sshs_model_hash"] == {"stored": None, "actual": model_hash(tensors), "ok": None}


def test_legacy_hash_of_an_unpadded_old_writer(tmp_path) -> None:
    """safetensors < 0.3 did not pad the header; kohya's legacy hash then saw a shifted window."""
    from loratool.io.hashes import hash_report

    tensors = _tensors(True)
    ss = {"ss_network_dim": "8", "ss_note": "x"}
    # an old writer's in-memory file, built by hand: same entries and data order, no padding
    order = sorted(tensors, key=lambda k: ({torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[tensors[k].dtype], k))
    header, offset = {"__metadata__": ss}, 0
    for k in order:
        n = tensors[k].numel() * tensors[k].element_size()
        header[k] = {"dtype": {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[tensors[k].dtype],
                     "shape": list(tensors[k].shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) % 8 != 0  # else padding would change nothing
    blob = len(raw).to_bytes(8, "little") + raw + b"".join(tensors[k].reshape(-1).view(torch.uint8).numpy().tobytes()
                                                           for k in order)
    old_legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    meta = finalize_metadata(tensors, ss)
    assert meta["sshs_legacy_hash"] != old_legacy
    meta["sshs_legacy_hash"] = old_legacy
    out = write_safetensors(tmp_path / "old.safetensors", tensors, meta)
    assert file_legacy_hash(out, padded=False) == old_legacy
    assert hash_report(out)["sshs_legacy_hash"]["ok"] is True
    meta["sshs_legacy_hash"] = "00000000"
    bad = write_safetensors(tmp_path / "bad.safetensors", tensors, meta)
    assert hash_report(bad)["sshs_legacy_hash"]["ok"] is False
