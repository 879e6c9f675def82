"""The safetensors serialisation: deterministic, byte-identical to the reference writer, shared storage
written in full. (Where the bytes go — atomically, never over an input — is tests/unit/test_io_output.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loratool.errors import LoraToolError
from loratool.io.output import TEMP_TAG
from loratool.io.safetensors import SafetensorsFile, load_file
from loratool.io.writer import serialize, write_safetensors


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
    return sorted(p.name for p in folder.iterdir() if TEMP_TAG in p.name)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_takes_huge_values_and_refuses_each_bad_one(tmp_path, dtype) -> None:
    """The writer's check sums each chunk first: a sum that overflows (huge but finite values) must still be
    written, and one NaN or inf anywhere, even beside values that would cancel it, refused."""
    big = torch.finfo(dtype).max
    huge = torch.full((1 << 12,), big, dtype=dtype)
    write_safetensors(tmp_path / "huge.safetensors", {"w": huge})
    assert torch.equal(load_file(tmp_path / "huge.safetensors")["w"], huge)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.zeros(3 << 20, dtype=dtype)
        t[(3 << 20) - 5] = bad
        with pytest.raises(LoraToolError, match="NaN|infinite"):
            write_safetensors(tmp_path / "bad.safetensors", {"w": t})
        assert not (tmp_path / "bad.safetensors").exists()
