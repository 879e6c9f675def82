"""A batch of an extraction arrives stacked: one buffer a side, module after module, seen as [n, rows, cols]."""

from __future__ import annotations

import torch

from loratool.io.sources import open_source
from loratool.io.weights import Segment, WeightRef, read_weight
from loratool.io.writer import write_safetensors
from loratool.ops.extract_plan import PlannedModule
from loratool.ops.extract_stream import _stage, batches, pair_batches, read_stacked, stream_pairs


def _files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(8, 6, generator=g).half(), "b": torch.randn(8, 6, generator=g).half(),
            "c": torch.randn(8, 6, generator=g).half(), "t": torch.randn(6, 8, generator=g).half(),
            "qkv": torch.randn(24, 6, generator=g).half(), "conv": torch.randn(8, 3, 1, 2, generator=g).half()}
    tuned = {k: (v.float() + 0.01).half() for k, v in base.items()}
    tuned["c"] = tuned["c"].bfloat16()  # another stored dtype on one side
    write_safetensors(tmp_path / "b.safetensors", base)
    write_safetensors(tmp_path / "t.safetensors", tuned)
    return tmp_path / "b.safetensors", tmp_path / "t.safetensors"


def _module(name: str, ref: WeightRef, shape=(8, 6)) -> PlannedModule:
    return PlannedModule("model", name, shape, ref, rank=2)


MODULES = [
    _module("a", WeightRef((Segment("a"),), (8, 6))),
    _module("t", WeightRef((Segment("t"),), (8, 6), transpose=True)),  # stored as its transpose
    _module("kq", WeightRef((Segment("qkv", 12, 16), Segment("qkv", 0, 4)), (8, 6))),  # rows of a fused weight
    _module("c", WeightRef((Segment("c"),), (8, 6))),
    _module("conv", WeightRef((Segment("conv"),), (8, 3, 1, 2)), (8, 3, 1, 2)),  # the same matrix shape, a conv
    _module("b", WeightRef((Segment("b"),), (8, 6))),
]


def test_batches_stack_only_what_one_buffer_can_hold(tmp_path):
    b, t = _files(tmp_path)
    with open_source(b) as bs, open_source(t) as ts:
        jobs = pair_batches(bs, ts, MODULES, budget=1 << 20)
        assert [[m.path for m in job] for job in jobs] == [["a", "kq", "conv", "b"], ["t"], ["c"]]
        for job in jobs:
            for src in (bs, ts):
                got = read_stacked(src, job)
                want = torch.stack([read_weight(src, m.ref).reshape(m.matrix_shape) for m in job])
                assert got.dtype == want.dtype and torch.equal(got, want), [m.path for m in job]
        assert read_stacked(ts, jobs[2]).dtype == torch.bfloat16
        # a budget of two modules' bytes splits the large group in plan order
        assert [[m.path for m in job] for job in pair_batches(bs, ts, MODULES, budget=2 * 2 * 96)][:2] == [
            ["a", "kq"], ["conv", "b"]]


def test_a_ramp_makes_the_first_batches_smaller_then_full(tmp_path):
    """On a GPU the first batches get 1/2**ramp of the budget, doubling up to it, so that the first
    decomposition starts while the readers fill the large batches; every module still comes once, in order."""
    same = [_module(f"m{i}", WeightRef((Segment(f"m{i}"),), (8, 6))) for i in range(40)]
    per = 4 * 8 * 6  # the default measure: the fp32 ΔW
    jobs = batches(same, budget=8 * per, ramp=2)
    assert [len(j) for j in jobs] == [2, 4, 8, 8, 8, 8, 2]
    assert [m.path for j in jobs for m in j] == [m.path for m in same]
    assert [len(j) for j in batches(same, budget=8 * per)] == [8, 8, 8, 8, 8]
    # a module larger than the ramp's first share still makes a batch of its own
    assert [len(j) for j in batches(same[:3], budget=per, ramp=3)] == [1, 1, 1]


def test_the_cpu_stream_yields_the_stacks_in_order(tmp_path):
    b, t = _files(tmp_path)
    with open_source(b) as bs, open_source(t) as ts:
        got = list(stream_pairs(bs, ts, MODULES, torch.device("cpu"), readers=2))
        assert [m.path for p in got for m in p.modules] == ["a", "kq", "conv", "b", "t", "c"]
        for p in got:
            assert p.base.shape == p.tuned.shape == (len(p.modules), 8, 6)
            for i, m in enumerate(p.modules):
                assert torch.equal(p.tuned[i], read_weight(ts, m.ref).reshape(8, 6))


def test_copies_are_merged_where_slot_and_buffer_bytes_run_on():
    dest, other = torch.empty(0), torch.empty(0)
    staged: list = []
    _stage(staged, dest, 0, 0, 128)
    _stage(staged, dest, 128, 128, 64)  # continues both: one copy
    _stage(staged, dest, 256, 192, 64)  # a gap in the buffer
    _stage(staged, dest, 320, 320, 64)  # a gap in the slot
    _stage(staged, other, 384, 384, 64)  # another buffer
    assert [(d is dest, a, s, n) for d, a, s, n in staged] == [
        (True, 0, 0, 192), (True, 256, 192, 64), (True, 320, 320, 64), (False, 384, 384, 64)]
