"""SafetensorsStream: tensors written as they come, the header last into reserved room; the file holds exactly
what the reference writer would (same tensors, metadata and hashes), or is that writer's file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from loratool.errors import LoraToolError
from loratool.io.hashes import hash_report
from loratool.io.output import Outputs
from loratool.io.safetensors import SafetensorsFile
from loratool.io.stream import SafetensorsStream, finite_bits, header_room
from loratool.io.writer import tensor_bytes, write_safetensors

META = {"ss_network_dim": "4", "loratool.note": "streamed"}


def tensors(seed: int = 0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(6):
        out[f"lora_unet_b{i}.lora_down.weight"] = torch.randn(4, 40 + i, generator=gen).to(dtype)
        out[f"lora_unet_b{i}.lora_up.weight"] = torch.randn(30 + i, 4, generator=gen).to(dtype)
        out[f"lora_unet_b{i}.alpha"] = torch.tensor(4.0, dtype=dtype)
    return out


def room_for(ts: dict[str, torch.Tensor], meta=META) -> int:
    entries = [(k, "BF16", tuple(t.shape)) for k, t in ts.items()]
    total = sum(t.numel() * 4 for t in ts.values())
    return header_room(entries, total, len(json.dumps(meta)) + 256)


def stream_write(path, parts: list[dict], final: dict, meta=META, room: int | None = None) -> bool:
    outputs = Outputs()
    with outputs.file(path) as fh:
        s = SafetensorsStream(fh, room if room is not None else room_for(final, meta))
        try:
            for part in parts:
                s.add(part)
            return s.finish(final, meta)
        finally:
            s.close()


def reference(tmp_path, ts, meta=META):
    path = tmp_path / "reference.safetensors"
    write_safetensors(path, ts, meta, hashes=True, force=True)
    return path


def loaded(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def same_content(a, b) -> None:
    ta, ma = loaded(a)
    tb, mb = loaded(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].reshape(-1).view(torch.uint8), tb[k].reshape(-1).view(torch.uint8)), k
    drop = ("sshs_model_hash",)  # the data region's hash: the same bytes in another order hash differently
    assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}


def test_streamed_file_holds_what_the_reference_writer_would(tmp_path):
    ts = tensors()
    names = list(ts)
    parts = [{k: ts[k] for k in names[i:i + 3]} for i in range(0, len(names), 3)][::-1]  # another order
    out = tmp_path / "s.safetensors"
    assert stream_write(out, parts, ts) is True
    same_content(out, reference(tmp_path, ts))
    report = hash_report(out)
    assert report["sshs_model_hash"]["ok"] and report["sshs_legacy_hash"]["ok"]
    f = SafetensorsFile(out)
    order = sorted(f.tensors.values(), key=lambda i: i.begin)
    assert [i.name for i in order] == [k for p in parts for k in p]  # data in the order the tensors came
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n == room_for(ts) and n % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")
    assert f.data_start == 8 + n


def test_scalars_made_again_with_the_same_value_let_the_stream_stand(tmp_path):
    ts = tensors()
    final = {k: (torch.tensor(t.item(), dtype=t.dtype) if t.dim() == 0 else t) for k, t in ts.items()}
    out = tmp_path / "s.safetensors"
    assert stream_write(out, [ts], final) is True
    same_content(out, reference(tmp_path, final))


def test_tensors_not_streamed_are_appended_at_the_end(tmp_path):
    ts = tensors()
    streamed = {k: v for k, v in ts.items() if "b5" not in k}
    out = tmp_path / "s.safetensors"
    assert stream_write(out, [streamed], ts) is True
    same_content(out, reference(tmp_path, ts))
    last = max(SafetensorsFile(out).tensors.values(), key=lambda i: i.begin)
    assert "b5" in last.name


@pytest.mark.parametrize("case", ["value", "alpha", "signed zero", "missing", "dtype", "room"])
def test_what_cannot_stand_is_rewritten_by_the_reference_writer(tmp_path, case):
    ts = tensors()
    streamed = dict(ts)
    final = dict(ts)
    room = None
    key = "lora_unet_b2.lora_up.weight"
    if case == "value":
        final[key] = ts[key] * 2  # what was written is not what the file must hold
    elif case == "alpha":
        final["lora_unet_b2.alpha"] = torch.tensor(5.0, dtype=torch.float16)  # a scalar made again, another value
    elif case == "signed zero":
        streamed["lora_unet_b2.alpha"] = torch.tensor(0.0, dtype=torch.float16)
        final["lora_unet_b2.alpha"] = torch.tensor(-0.0, dtype=torch.float16)  # equal values, other bits
    elif case == "missing":
        del final[key]  # written, but not the file's
    elif case == "dtype":
        final[key] = ts[key].float()
    else:
        room = 64  # the header outgrew its room
    out = tmp_path / "s.safetensors"
    assert stream_write(out, [streamed], final, room=room) is False
    assert out.read_bytes() == reference(tmp_path, final).read_bytes()


def test_a_tensor_that_would_sit_misaligned_is_held_back_and_written_aligned(tmp_path):
    odd = {"a.weight": torch.ones(3, dtype=torch.float16)}  # 6 bytes: a float32 cannot follow
    wide = {"b.alpha": torch.tensor(0.1, dtype=torch.float32), "c.weight": torch.ones(5, dtype=torch.float16)}
    final = {**odd, **wide}
    out = tmp_path / "s.safetensors"
    stream_write(out, [odd, wide], final)
    for info in SafetensorsFile(out).tensors.values():
        assert info.begin % torch.empty((), dtype=getattr(torch, {"F16": "float16", "F32": "float32"}[info.dtype])
                                        ).element_size() == 0, info.name
    same_content(out, reference(tmp_path, final))


def test_shared_and_non_contiguous_views_are_written_whole(tmp_path):
    base = torch.randn(8, 6).half()
    ts = {"t.weight": base.t(), "v.weight": base[2:5]}
    out = tmp_path / "s.safetensors"
    assert stream_write(out, [ts], ts) is True
    same_content(out, reference(tmp_path, ts))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_tensor_is_refused_by_name_and_nothing_is_left(tmp_path, bad):
    ts = tensors()
    key = "lora_unet_b3.lora_down.weight"
    ts[key] = ts[key].clone()
    ts[key][1, 2] = bad
    out = tmp_path / "s.safetensors"
    with pytest.raises(LoraToolError, match="lora_unet_b3.lora_down.weight"):
        stream_write(out, [ts], ts)
    assert os.listdir(tmp_path) == []  # no output, no temporary


def test_an_error_while_streaming_leaves_no_output(tmp_path):
    ts = tensors()
    out = tmp_path / "s.safetensors"
    with pytest.raises(RuntimeError, match="the work failed"):
        with Outputs().file(out) as fh:
            s = SafetensorsStream(fh, room_for(ts))
            try:
                s.add(ts)
                raise RuntimeError("the work failed")
            finally:
                s.close()
    assert os.listdir(tmp_path) == []


def test_a_name_given_twice_is_refused(tmp_path):
    ts = tensors()
    with pytest.raises(LoraToolError, match="two tensors are named"):
        stream_write(tmp_path / "s.safetensors", [ts, {"lora_unet_b0.alpha": ts["lora_unet_b0.alpha"]}], ts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_finite_bits_agrees_with_torch(dtype):
    from loratool.io.writer import dtype_name

    gen = torch.Generator().manual_seed(3)
    cases = [torch.randn(257, generator=gen) * 1e4, torch.tensor([0.0, -0.0]), torch.tensor([torch.finfo(torch.float16).max])]
    for v in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(100, generator=gen)
        t[57] = v
        cases.append(t)
    if dtype.is_floating_point:
        cases.append(torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).tiny, -torch.finfo(dtype).max]))
    for case in cases:
        t = case.to(dtype)
        expect = bool(torch.isfinite(t).all())
        assert finite_bits(tensor_bytes(t), dtype_name(t)) is expect, (dtype, case)
        scratch = np.empty(t.numel() * t.element_size(), dtype=np.uint8)
        assert finite_bits(tensor_bytes(t), dtype_name(t), scratch) is expect, (dtype, case)


def test_swapped_halves_of_an_outline_stay_on_the_meta_device():
    """A streamed file's room is reserved from an outline on the meta device; a family whose modulation
    rows are stored swapped (SD3's, Flux's final layer) keeps the shape there without any arithmetic,
    and real rows are swapped exactly (an involution)."""
    from loratool.formats.build import swap_halves

    outline = torch.empty((3072, 64), dtype=torch.float32, device="meta")
    got = swap_halves(outline)
    assert got.is_meta and got.shape == outline.shape and got.dtype == outline.dtype
    rows = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(swap_halves(rows)[:3], rows[3:]) and torch.equal(swap_halves(swap_halves(rows)), rows)


def batch_views(dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Factors as an extraction batch hands them over: views of two host tensors (downs, ups), and alphas."""
    gen = torch.Generator().manual_seed(5)
    downs = torch.randn(4, 3, 40, generator=gen).to(dtype)
    ups = torch.randn(4, 30, 3, generator=gen).to(dtype)
    out = {}
    for i in range(4):
        out[f"lora_unet_b{i}.lora_down.weight"] = downs[i]
        out[f"lora_unet_b{i}.lora_up.weight"] = ups[i]
        out[f"lora_unet_b{i}.alpha"] = torch.tensor(3.0, dtype=dtype)
    return out


def test_tensors_back_to_back_in_one_storage_are_one_run():
    from loratool.io.stream import _runs

    ts = batch_views()
    downs = [(k, t, "F16") for k, t in ts.items() if "down" in k]
    ups = [(k, t, "F16") for k, t in ts.items() if "up" in k]
    runs = list(_runs(downs + ups))
    assert [len(r) for r, _, _ in runs] == [4, 4]
    assert bytes(runs[0][1]) == b"".join(bytes(tensor_bytes(t)) for _, t, _ in downs)
    shuffled = [downs[0], downs[2], downs[1], ups[0]]  # out of place, another storage: runs of one
    assert [len(r) for r, _, _ in _runs(shuffled)] == [1, 1, 1, 1]
    as_f32 = [downs[0], (downs[1][0], downs[1][1], "BF16")]  # another dtype name: its own run
    assert [len(r) for r, _, _ in _runs(as_f32)] == [1, 1]


def test_a_batch_streamed_as_runs_holds_what_the_reference_writer_would(tmp_path):
    ts = batch_views()
    order = sorted(ts, key=lambda k: ("alpha" in k, "up" in k, k))  # downs, ups, alphas: two runs and the rest
    out = tmp_path / "s.safetensors"
    assert stream_write(out, [{k: ts[k] for k in order}], ts) is True
    same_content(out, reference(tmp_path, ts))
    assert all(v["ok"] for v in hash_report(out).values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_inside_a_run_names_its_tensor(tmp_path, bad):
    ts = batch_views()
    ts["lora_unet_b2.lora_up.weight"][7, 1] = bad  # a view: the run's storage holds it
    order = sorted(ts, key=lambda k: ("alpha" in k, "up" in k, k))
    out = tmp_path / "s.safetensors"
    with pytest.raises(LoraToolError, match="lora_unet_b2.lora_up.weight"):
        stream_write(out, [{k: ts[k] for k in order}], ts)
    assert os.listdir(tmp_path) == []


def test_runs_longer_than_a_step_are_checked_every_step(tmp_path, monkeypatch):
    """A run is judged finite a STEP at a time (here 64 bytes), then hashed and written whole: the file and
    its sshs hashes are the reference writer's; a NaN in a later step still names its tensor."""
    import loratool.io.stream as stream

    monkeypatch.setattr(stream, "STEP", 64)
    ts = batch_views()
    order = sorted(ts, key=lambda k: ("alpha" in k, "up" in k, k))
    out = tmp_path / "s.safetensors"
    assert stream_write(out, [{k: ts[k] for k in order}], ts) is True
    same_content(out, reference(tmp_path, ts))
    assert all(v["ok"] for v in hash_report(out).values())
    os.remove(out)
    ts["lora_unet_b3.lora_down.weight"][2, 5] = float("nan")  # well past the first step of the downs' run
    with pytest.raises(LoraToolError, match="lora_unet_b3.lora_down.weight"):
        stream_write(out, [{k: ts[k] for k in order}], ts)
    assert not out.exists()


def test_a_batch_s_scalars_are_gathered_into_one_tensor_a_dtype():
    from loratool.formats.stream import _gather_scalars

    ts = {"a.alpha": torch.tensor(4.0, dtype=torch.float16), "b.alpha": torch.tensor(8.0, dtype=torch.float16),
          "c.alpha": torch.tensor(3.5), "d.lora_down.weight": torch.ones(2, 3, dtype=torch.float16)}
    before, down = {k: t.clone() for k, t in ts.items()}, ts["d.lora_down.weight"]
    _gather_scalars(ts)
    assert all(torch.equal(ts[k], before[k]) and ts[k].dtype == before[k].dtype for k in ts)
    assert ts["a.alpha"].untyped_storage().data_ptr() == ts["b.alpha"].untyped_storage().data_ptr()
    assert ts["a.alpha"].dim() == 0 and ts["b.alpha"].storage_offset() == 1
    assert ts["d.lora_down.weight"] is down  # only the 0-d ones are replaced


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_finite_bits_with_a_reused_scratch_buffer(dtype):
    """The writer judges every run through one scratch buffer: leftovers of a longer earlier run must not
    decide a shorter later one, and an empty tensor is finite."""
    from loratool.io.writer import dtype_name

    scratch = np.empty(4096, dtype=np.uint8)
    bad = torch.zeros(300).to(dtype)
    bad[299] = float("nan")
    assert finite_bits(tensor_bytes(bad), dtype_name(bad), scratch) is False  # fills the buffer's tail
    good = torch.ones(10).to(dtype)
    assert finite_bits(tensor_bytes(good), dtype_name(good), scratch) is True
    edge = torch.full((5,), torch.finfo(torch.float16).max).to(dtype)
    edge[2] = -float("inf")
    assert finite_bits(tensor_bytes(edge), dtype_name(edge), scratch) is False
    empty = torch.empty(0, dtype=dtype)
    assert finite_bits(tensor_bytes(empty), dtype_name(empty), scratch) is True
