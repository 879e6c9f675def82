"""A layer weight rebuilt from row segments of stored tensors, read into one staging buffer."""

from __future__ import annotations

import torch

from loratool.io.sources import open_source
from loratool.io.weights import ALIGN, Segment, WeightRef, read_weight, weight_nbytes
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
        # into one buffer: each segment starts on a 64-byte boundary, the result a view when it can be
        assert weight_nbytes(src, kq) == 2 * ALIGN  # two segments of 24 bytes, each padded to 64
        buf = torch.zeros(weight_nbytes(src, kq) + weight_nbytes(src, tr), dtype=torch.uint8)
        whole = WeightRef((Segment("t"),), (4, 6))
        got = read_weight(src, whole, buf)
        assert torch.equal(got, t) and got.data_ptr() == buf.data_ptr()
        assert torch.equal(read_weight(src, kq, buf), torch.cat([qkv[3:6], qkv[0:3]]))
