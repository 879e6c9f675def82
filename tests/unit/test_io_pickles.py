"""Pickles are read only through the weights-only unpickler; anything else is refused and its
code never runs."""

from __future__ import annotations

import builtins
import os
import pickle

import pytest
import torch

from loratool.errors import LoraToolError, UnsupportedInput
from loratool.io.pickles import is_pickle_path, load_pickle, read_pickle


class _Evil:
    """Unpickling this calls exec(...) — which writes a marker file — unless the loader refuses."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "raw_pickle", "raw_pickle_p2"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how) -> None:
    marker = tmp_path / "ran.txt"
    payload = {"lora.down.weight": torch.zeros(2, 2), "x": _Evil(str(marker))}
    p = tmp_path / "evil.pt"
    if how == "torch_zip":
        torch.save(payload, p)
    elif how == "torch_legacy":
        torch.save(payload, p, _use_new_zipfile_serialization=False)
    elif how == "raw_pickle":
        p.write_bytes(pickle.dumps(payload))
    else:
        p.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(UnsupportedInput) as e:
        read_pickle(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and "\n" not in msg
    assert "full unpickling" in msg and "safetensors" in msg
    assert "(Unsupported " in msg  # says what the unpickler stumbled on
    assert not marker.exists()


def test_real_diffusers_pickle_loads_weights_only(real_dir, monkeypatch) -> None:
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k)
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    path = real_dir / "bad" / "sd15_diffusers_pickle.bin"
    c = read_pickle(path)
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert calls[0].get("mmap") is True  # a zip-format file: memory-mapped
    assert c.layout == "state_dict" and c.wrapper is None and c.ignored == []
    assert len(c.tensors) == 256
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"
    assert c.tensors[k].shape == (4, 320) and c.tensors[k].dtype == torch.float32


def test_state_dict_wrapper_unwrapped_and_extras_reported(tmp_path) -> None:
    sd = {"model.diffusion_model.w": torch.ones(3), "cond.nested": {"a": torch.zeros(1), "note": "x"}}
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 1000, "epoch": 3}, p)
    c = read_pickle(p)
    assert c.wrapper == "state_dict" and c.layout == "state_dict"
    assert sorted(c.tensors) == ["cond.nested.a", "model.diffusion_model.w"]
    assert sorted(c.ignored) == ["cond.nested.note", "epoch", "global_step"]
    assert torch.equal(load_pickle(p)["model.diffusion_model.w"], torch.ones(3))


def test_cloneofsimo_legacy_list_recognised(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 1, generator=g), torch.randn(1, 4, generator=g)] * 2
    p = tmp_path / "lora_weight.pt"
    torch.save(weights, p)
    c = read_pickle(p)
    assert c.layout == "tensor_list" and sorted(c.tensors) == ["0", "1", "2", "3"]
    back = load_pickle(p)
    assert isinstance(back, list) and all(torch.equal(a, b) for a, b in zip(back, weights, strict=True))


def test_legacy_non_zip_format_loads(tmp_path) -> None:
    p = tmp_path / "old.bin"
    torch.save({"w": torch.arange(4.0)}, p, _use_new_zipfile_serialization=False)
    assert torch.equal(load_pickle(p)["w"], torch.arange(4.0))


@pytest.mark.parametrize("content, match", [
    (b"", "it is empty"),
    (b"hello world, not a pickle", "not a readable torch file"),
    (b"PK\x03\x04 broken zip", "not a readable torch file"),
])
def test_junk_is_one_line_error(tmp_path, content, match) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(content)
    with pytest.raises(LoraToolError, match=match) as e:
        read_pickle(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_wrong_shapes_of_content(tmp_path) -> None:
    for obj, match in [([1, 2], "not a list of tensors"), (3, "holds a int"), ({"a": 1}, "holds no tensors")]:
        p = tmp_path / "x.pt"
        torch.save(obj, p)
        with pytest.raises(LoraToolError, match=match):
            read_pickle(p)
    with pytest.raises(LoraToolError, match="no such file"):
        read_pickle(tmp_path / "missing.pt")
    with pytest.raises(LoraToolError, match="is a folder"):
        read_pickle(tmp_path)


def test_suffixes() -> None:
    assert all(is_pickle_path(f"a{s}") for s in (".pt", ".PTH", ".bin", ".ckpt"))
    assert not is_pickle_path("a.safetensors") and not is_pickle_path(os.path.join("x", "a.json"))


def test_safetensors_under_a_pickle_name_is_not_unpickled(tmp_path) -> None:
    from loratool.io.writer import serialize

    p = tmp_path / "model.bin"
    p.write_bytes(serialize({"a" * 72: torch.ones(2)}))  # header length 128: its first byte is 0x80
    with pytest.raises(LoraToolError, match="is a safetensors file despite its name"):
        read_pickle(p)
