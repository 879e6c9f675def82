"""The GPU kernel warm-up of an extraction: started once per device and process, before planning."""

from __future__ import annotations

import threading

import pytest

import loratool.ops.extract_startup as startup
from loratool.ops.extract import warm_start


@pytest.fixture
def counted(monkeypatch):
    """warm_kernels replaced by a counter (no GPU here); a clean memo for the test."""
    calls: list[str] = []
    gate = threading.Event()

    def fake(device):
        calls.append(str(device))
        gate.wait(5)
        if str(device) == "bad":
            raise RuntimeError("no such card")

    monkeypatch.setattr(startup, "warm_kernels", fake)
    monkeypatch.setattr(startup, "_WARMING", {})
    return calls, gate


def test_one_warm_up_per_device_and_process(counted):
    calls, gate = counted
    first = startup.warming("cuda:0")
    again = startup.warming("cuda:0")  # while the first still runs: the same future, no second warm-up
    other = startup.warming("cuda:1")
    gate.set()
    assert again is first and other is not first
    first.result(5), other.result(5)
    assert startup.warming("cuda:0") is first and first.done()
    assert sorted(calls) == ["cuda:0", "cuda:1"]


def test_a_failed_warm_up_is_tried_again(counted):
    calls, gate = counted
    gate.set()
    failed = startup.warming("bad")
    with pytest.raises(RuntimeError, match="no such card"):
        failed.result(5)
    retried = startup.warming("bad")
    assert retried is not failed and calls == ["bad", "bad"]
    with pytest.raises(RuntimeError):
        retried.result(5)


def test_warm_start_only_for_a_gpu(counted):
    calls, gate = counted
    gate.set()
    assert warm_start("cpu") is None
    assert warm_start("not a device") is None  # the extraction names a bad device where it takes it
    assert calls == []


def test_extraction_on_the_cpu_starts_no_warm_up(counted, tmp_path):
    import torch

    from loratool.io.writer import write_safetensors
    from loratool.ops.extract import extract
    from loratool.ops.extract_plan import ExtractOptions

    calls, gate = counted
    gate.set()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=gen)
    write_safetensors(tmp_path / "b.safetensors", {"l.weight": w}, None)
    write_safetensors(tmp_path / "t.safetensors", {"l.weight": w + 0.1 * torch.randn(64, 48, generator=gen)}, None)
    res = extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", ExtractOptions(rank=4, arch="generic"))
    assert len(res.adapter.modules) == 1 and calls == [] and "warm_s" not in res.profile


def test_the_warm_up_batches_take_the_path_a_real_batch_takes():
    """The warm-up loads a batch's kernels only if its tiny batches go where real ones go: the randomized
    decomposition (not the exact one small matrices get), one module unchanged, both stored dtypes."""
    import torch

    from loratool.ops.extract_batch import extract_batch
    from loratool.ops.extract_plan import ExtractOptions

    pairs = startup.warm_up_batches("cpu")
    assert [p.base.dtype for p in pairs] == [torch.float16, torch.bfloat16]
    for pair in pairs:
        dtype = pair.base.dtype
        reports, modules = extract_batch(pair, ExtractOptions(rank=startup.WARM_RANK), dtype)
        assert [r.status for r in reports] == ["unchanged", "ok", "ok"]
        assert {r.method for r in reports if r.status == "ok"} == {"randomized"}
        assert len(modules) == 2 and modules[0].up.dtype == dtype
