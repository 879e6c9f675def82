"""A layer weight rebuilt from row segments of stored tensors, read into one staging buffer."""

from __future__ import annotations

import torch

from loratool.io.sources import open_source
from loratool.io.weights import Segment, WeightRef, as_matrices, read_into, read_weight, weight_nbytes
from loratool.io.writer import write_safetensors


def test_fused_rows_in_another_order_transposed_and_whole(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(9, 4, generator=g).half()  # q, k, v stacked, 3 rows each
    t = torch.randn(4, 6, generator=g)
    write_safetensors(tmp_path / "m.safetensors", {"qkv": qkv, "t": t})
    with open_source(tmp_path / "m.safetensors") as src:
        kq = WeightRef((Segment("qkv", 3, 6), Segment("qkv", 0, 3)), (6, 4))  # k then q
        assert torch.equal(read_weight(src, kq), torch.cat([qkv[3:6], qkv[0:3]]))
        tail = WeightRef((Segment("qkv", 6),), (3, 4))  # from row 6 to the end
        assert torch.equal(read_weight(src, tail), qkv[6:])
        tr = WeightRef((Segment("t"),), (6, 4), transpose=True)
        assert torch.equal(read_weight(src, tr), t.T)
        # into one buffer: the segments back to back, the result a view of it unless stored transposed
        assert weight_nbytes(src, kq) == 2 * 3 * 4 * 2  # two segments of three fp16 rows of 4
        buf = torch.zeros(weight_nbytes(src, kq) + weight_nbytes(src, tr), dtype=torch.uint8)
        whole = WeightRef((Segment("t"),), (4, 6))
        got = read_weight(src, whole, buf)
        assert torch.equal(got, t) and got.data_ptr() == buf.data_ptr()
        got = read_weight(src, kq, buf)
        assert torch.equal(got, torch.cat([qkv[3:6], qkv[0:3]])) and got.data_ptr() == buf.data_ptr()


def test_several_weights_in_one_buffer_are_seen_as_matrices(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    w = {"a": torch.randn(5, 3, 2, 2, generator=g), "b": torch.randn(5, 3, 2, 2, generator=g),
         "ta": torch.randn(4, 5, generator=g), "tb": torch.randn(4, 5, generator=g)}
    write_safetensors(tmp_path / "m.safetensors", w)
    with open_source(tmp_path / "m.safetensors") as src:
        for names, transpose, shape in ((("a", "b"), False, (5, 3, 2, 2)), (("ta", "tb"), True, (5, 4))):
            refs = [WeightRef((Segment(n),), shape, transpose) for n in names]
            per = weight_nbytes(src, refs[0])
            buf = torch.empty(2 * per, dtype=torch.uint8)
            for i, ref in enumerate(refs):
                read_into(src, ref, buf[i * per:])
            got = as_matrices(buf, refs[0], 2, torch.float32)
            want = torch.stack([read_weight(src, ref).reshape(5, -1) for ref in refs])
            assert got.shape == want.shape and torch.equal(got, want)
            assert got.data_ptr() == buf.data_ptr()  # a view
