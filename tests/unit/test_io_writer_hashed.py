"""``write_safetensors(..., hashes=True)``: the hashes computed while writing give the very bytes of
writing ``finalize_metadata``'s metadata in one go, the digest is in place before the fsync, and a
failure still leaves nothing behind."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from loratool.io import writer
from loratool.io.hashes import check_hash, hash_report
from loratool.io.metadata import finalize_metadata
from loratool.io.writer import serialize, write_safetensors


def _tensors(seed: int, big: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "b.lora_down.weight": torch.randn(4, 16, generator=g),
        "b.lora_up.weight": torch.randn(16, 4, generator=g).half(),
        "b.alpha": torch.tensor(4.0),
        "e.empty": torch.zeros(0, 3),
        "flag": torch.tensor([True, False]),
    }
    if big:  # past the legacy window at 1 MiB, and several chunks per tensor
        out["a.lora_up.weight"] = torch.randn(700, 600, generator=g)
        out["c.lora_down.weight"] = torch.randn(300, 500, generator=g).bfloat16()
    return out


META = {"ss_network_dim": "4", "modelspec.title": 'x "sshs_model_hash":"' + "0" * 64 + '"',
        "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"}


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("meta", [None, {}, META])
def test_same_bytes_as_hashing_first(tmp_path, monkeypatch, big, meta) -> None:
    monkeypatch.setattr(writer, "HASH_CHUNK", 1 << 18)
    tensors = _tensors(3, big)
    path = write_safetensors(tmp_path / "h.safetensors", tensors, meta, hashes=True)
    want = serialize(tensors, finalize_metadata(tensors, meta))
    assert path.read_bytes() == want
    assert check_hash(path) is True
    assert all(row["ok"] for row in hash_report(path).values())


def test_digest_is_in_place_before_fsync(tmp_path, monkeypatch) -> None:
    seen: list[bytes] = []
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            seen.append(os.pread(fd, 1 << 20, 0))
        return real_fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    tensors = _tensors(4, True)
    path = write_safetensors(tmp_path / "f.safetensors", tensors, {"ss_a": "1"}, hashes=True)
    digest = hashlib.sha256(b"".join(bytes(writer.tensor_bytes(tensors[n]))
                                     for n in writer.ordered_names(tensors))).hexdigest()
    assert seen and digest.encode() in seen[0] and b"0" * 64 not in seen[0]
    assert path.read_bytes()[:1 << 20] == seen[0]


def test_failure_mid_hashed_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    real, calls = writer.tensor_bytes, {"n": 0}

    def failing(t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(t)

    monkeypatch.setattr(writer, "tensor_bytes", failing)
    with pytest.raises(OSError):
        write_safetensors(target, _tensors(5, True), {"ss_a": "1"}, force=True, hashes=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"] and target.read_bytes() == b"old"
