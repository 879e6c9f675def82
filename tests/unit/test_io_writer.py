"""The atomic writer: all-or-nothing, never over an input, deterministic, byte-identical to the
reference writer, shared storage written in full."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loratool.errors import LoraToolError
from loratool.io import writer
from loratool.io.safetensors import SafetensorsFile, load_file
from loratool.io.writer import AtomicFile, check_output, serialize, write_safetensors


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_x.lora_down.weight": torch.randn(4, 16, generator=g),
        "lora_unet_x.lora_up.weight": torch.randn(16, 4, generator=g).half(),
        "lora_unet_x.alpha": torch.tensor(4.0),
        "lora_te_y.lora_down.weight": torch.randn(2, 8, generator=g).bfloat16(),
        "idx": torch.arange(3, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
    }


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _split(blob: bytes) -> tuple[int, dict, list, bytes]:
    """(header length, metadata, tensor entries in header order, data region)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    return n, meta, list(header.items()), blob[8 + n:]


@pytest.mark.parametrize("meta", [None, {}, {"ss_network_dim": "4"}])
def test_byte_identical_to_reference(tmp_path, meta) -> None:
    t = _tensors()
    out = write_safetensors(tmp_path / "a.safetensors", t, meta)
    assert out.read_bytes() == st_save(t, meta) == serialize(t, meta)


def test_identical_to_reference_but_for_metadata_order(tmp_path) -> None:
    # the reference keeps metadata in a hash map, so its order changes from run to run; ours is sorted
    meta = {"b": "2", "a": "1", "ss_x": "{\"k\": 1}", "\u00fc": "\u00f1"}
    t = _tensors()
    ours, ref = serialize(t, meta), st_save(t, meta)
    assert len(ours) == len(ref)
    assert _split(ours) == _split(ref)
    assert list(_split(ours)[1]) == sorted(meta)


def test_reference_metadata_order_does_not_matter(tmp_path) -> None:
    t = _tensors()
    a = serialize(t, {"z": "1", "a": "2"})
    b = serialize(t, {"a": "2", "z": "1"})
    assert a == b  # keys are sorted: one byte sequence per content


def test_deterministic_across_calls_and_key_order(tmp_path) -> None:
    t = _tensors()
    rev = dict(reversed(list(t.items())))
    a = write_safetensors(tmp_path / "a.safetensors", t, {"k": "v"}).read_bytes()
    b = write_safetensors(tmp_path / "b.safetensors", rev, {"k": "v"}).read_bytes()
    assert a == b


def test_metadata_values_must_be_strings(tmp_path) -> None:
    for bad in ({"a": 1}, {"a": None}, {1: "a"}, {"a": b"x"}):
        with pytest.raises(LoraToolError, match="must map a string to a string"):
            write_safetensors(tmp_path / "a.safetensors", _tensors(), bad)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_shared_storage_written_in_full(tmp_path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    t = {
        "whole": base,
        "again": base,  # the same tensor under two names
        "rows": base[1:3],  # a contiguous view with an offset
        "col": base[:, 2],  # a strided view
        "tr": base.t(),  # a transposed view
        "neg": torch.neg(base)._neg_view() if hasattr(torch.Tensor, "_neg_view") else -base,
        "conj": torch.complex(base, base).conj(),  # a lazily conjugated view
    }
    out = write_safetensors(tmp_path / "s.safetensors", t)
    back = load_file(out)
    for k, v in t.items():
        assert torch.equal(back[k], v.resolve_conj().resolve_neg()), k
    ref = st_load(out.read_bytes())  # the reference reader agrees
    assert torch.equal(ref["col"], base[:, 2]) and torch.equal(ref["tr"], base.t())
    # and the bytes are what the reference writes for independent copies
    clones = {k: v.resolve_conj().resolve_neg().contiguous().clone() for k, v in t.items()}
    assert out.read_bytes() == st_save(clones)


def test_cuda_like_and_grad_tensors(tmp_path) -> None:
    t = {"w": torch.ones(3, requires_grad=True) * 2}
    assert torch.equal(load_file(write_safetensors(tmp_path / "g.safetensors", t))["w"], torch.full((3,), 2.0))
    with pytest.raises(LoraToolError, match="sparse"):
        write_safetensors(tmp_path / "sp.safetensors", {"s": torch.eye(3).to_sparse()})
    with pytest.raises(LoraToolError, match="meta device"):
        write_safetensors(tmp_path / "m.safetensors", {"s": torch.empty(3, device="meta")})
    assert _leftovers(tmp_path) == []


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    real = writer.tensor_bytes

    def failing(t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(t)

    monkeypatch.setattr(writer, "tensor_bytes", failing)
    target = tmp_path / "out.safetensors"
    with pytest.raises(OSError):
        write_safetensors(target, _tensors())
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old contents")
    monkeypatch.setattr(writer, "tensor_bytes", lambda t: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(target, _tensors(), force=True)
    assert target.read_bytes() == b"old contents" and _leftovers(tmp_path) == []


def test_failed_rename_leaves_no_temp(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(writer.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(18, "cross-device")))
    with pytest.raises(OSError):
        write_safetensors(tmp_path / "x.safetensors", _tensors())
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_fsyncs_before_rename(tmp_path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(writer.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    with AtomicFile(tmp_path / "f.bin") as fh:
        fh.write(b"abc")
        assert not (tmp_path / "f.bin").exists()  # nothing visible before the end
    assert events[:2] == ["fsync", "replace"] and (tmp_path / "f.bin").read_bytes() == b"abc"


def test_new_file_gets_the_usual_mode(tmp_path) -> None:
    mask = os.umask(0o022)
    try:
        out = write_safetensors(tmp_path / "m.safetensors", _tensors())
    finally:
        os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_refuses_existing_output_without_force(tmp_path) -> None:
    target = tmp_path / "o.safetensors"
    target.write_bytes(b"keep")
    with pytest.raises(LoraToolError, match="output exists \\(use --force to overwrite\\)") as e:
        write_safetensors(target, _tensors())
    assert str(target) in str(e.value) and target.read_bytes() == b"keep"
    write_safetensors(target, _tensors(), force=True)
    assert SafetensorsFile(target).keys()


def test_refuses_to_overwrite_an_input_by_any_spelling(tmp_path, monkeypatch) -> None:
    src = tmp_path / "in.safetensors"
    write_safetensors(src, _tensors())
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    os.symlink(src, tmp_path / "link.safetensors")
    os.link(src, tmp_path / "hard.safetensors")
    monkeypatch.chdir(tmp_path)
    spellings = [src, "in.safetensors", "./sub/../in.safetensors", tmp_path / "link.safetensors",
                 tmp_path / "hard.safetensors"]
    for out in spellings:
        with pytest.raises(LoraToolError, match="refusing to overwrite an input"):
            write_safetensors(out, _tensors(1), force=True, inputs=[src])
        with pytest.raises(LoraToolError, match="refusing to overwrite an input"):
            write_safetensors(src, _tensors(1), force=True, inputs=[out])
    assert src.read_bytes() == before


def test_refuses_output_inside_an_input_folder_and_missing_folder(tmp_path) -> None:
    folder = tmp_path / "peft"
    folder.mkdir()
    with pytest.raises(LoraToolError, match="refusing to overwrite an input"):
        check_output(folder / "adapter_model.safetensors", inputs=[folder])
    with pytest.raises(LoraToolError, match="folder does not exist"):
        check_output(tmp_path / "nope" / "x.safetensors")
    with pytest.raises(LoraToolError, match="is a folder"):
        check_output(folder, force=True)


def test_reserved_or_non_string_tensor_names(tmp_path) -> None:
    for bad in ({"__metadata__": torch.ones(1)}, {3: torch.ones(1)}):
        with pytest.raises(LoraToolError, match="cannot name a tensor"):
            write_safetensors(tmp_path / "n.safetensors", bad)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_real_adapters_rewrite_to_the_same_bytes(real_dir) -> None:
    """Read every real adapter and write it again: the same data region, tensor entries and metadata;
    the same bytes where the producer used a modern reference writer (metadata order aside, which
    the reference leaves to a hash map)."""
    for path in sorted((real_dir / "adapters").glob("*.safetensors")):
        original = path.read_bytes()
        with SafetensorsFile(path) as f:
            tensors = {k: f.get(k) for k in f.keys()}
            meta = dict(f.metadata) if f.metadata_present else None
            again = serialize(tensors, meta)
        n_old, meta_old, entries_old, data_old = _split(original)
        n_new, meta_new, entries_new, data_new = _split(again)
        assert data_new == data_old and entries_new == entries_old and meta_new == meta_old, path.name
        if n_old % 8 == 0:  # a modern writer (older safetensors did not pad the header to 8 bytes)
            assert n_new == n_old, path.name
            if meta is None or len(meta) <= 1:
                assert again == original, path.name
