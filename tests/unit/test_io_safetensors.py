"""The strict lazy reader: every defect is one SafetensorsError line; every dtype round-trips
against the reference `safetensors` package; tensors stay valid and file handles do not leak."""

from __future__ import annotations

import gc
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loratool.errors import LoraToolError, SafetensorsError
from loratool.io.safetensors import DTYPES, MissingTensor, SafetensorsFile, load_file, read_metadata
from loratool.io.writer import serialize

REFERENCE_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
]


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns of a dtype (NaNs included for floats); bool as 0/1."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    size = torch.empty((), dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * size,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _file(tmp_path, name: str, blob: bytes):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def _raw_file(tmp_path, header: object, data: bytes = b"", *, raw: bytes | None = None):
    body = raw if raw is not None else json.dumps(header).encode()
    return _file(tmp_path, "t.safetensors", struct.pack("<Q", len(body)) + body + data)


def _message(path) -> str:
    with pytest.raises(SafetensorsError) as e:
        SafetensorsFile(path)
    line = str(e.value)
    assert "\n" not in line and line.startswith(str(path) + ": ")
    return line


# -- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=str)
def test_reference_file_reads_bit_exact(tmp_path, dtype) -> None:
    tensors = {"w": _random(dtype, (3, 5)), "s": _random(dtype, ()), "e": _random(dtype, (0, 4))}
    blob = st_save(tensors, {"k": "v"})
    p = _file(tmp_path, "a.safetensors", blob)
    with SafetensorsFile(p) as f:
        assert f.metadata == {"k": "v"}
        for k, t in tensors.items():
            got = f.get(k)
            assert got.dtype == dtype and tuple(got.shape) == tuple(t.shape)
            assert _bits(got) == _bits(t)
            assert f.shape(k) == tuple(t.shape) and f.dtype(k) == dtype
    # and our writer makes the very same bytes, which the reference reads back
    assert serialize(tensors, {"k": "v"}) == blob
    back = st_load(serialize(tensors, {"k": "v"}))
    assert all(_bits(back[k]) == _bits(t) for k, t in tensors.items())


def test_dtype_table_covers_reference_dtypes() -> None:
    names = {name for name, (t, _) in DTYPES.items() if t is not None}
    assert {"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2", "I8", "U8", "I16", "I32", "I64", "BOOL"} <= names


def test_e8m0_round_trips_through_our_own_writer(tmp_path) -> None:
    dt = getattr(torch, "float8_e8m0fnu", None)
    if dt is None:
        pytest.skip("this torch has no float8_e8m0fnu")
    t = _random(dt, (4, 4))
    p = _file(tmp_path, "a.safetensors", serialize({"t": t}))
    with SafetensorsFile(p) as f:
        assert f.info("t").dtype == "F8_E8M0" and _bits(f.get("t")) == _bits(t)


def test_tensor_views_are_copy_on_write(tmp_path) -> None:
    p = _file(tmp_path, "a.safetensors", st_save({"w": torch.zeros(4)}))
    before = p.read_bytes()
    with SafetensorsFile(p) as f:
        t = f.get("w")
        t += 1  # writes to the private map, never the file
        assert torch.equal(t, torch.ones(4))
    assert p.read_bytes() == before


def test_header_is_read_without_touching_data(tmp_path, monkeypatch) -> None:
    p = _file(tmp_path, "a.safetensors", st_save({"w": torch.zeros(1000)}))
    import mmap as mmap_mod

    calls = []
    monkeypatch.setattr(mmap_mod, "mmap", lambda *a, **k: calls.append(a))
    with SafetensorsFile(p) as f:
        assert f.keys() == ["w"] and f.info("w").nbytes == 4000
    assert calls == []


# -- every failure: one line, our type -----------------------------------------------------------

def test_too_small(tmp_path) -> None:
    assert "too small (0 bytes)" in _message(_file(tmp_path, "a.safetensors", b""))
    assert "too small (5 bytes)" in _message(_file(tmp_path, "a.safetensors", b"\x01\x00\x00\x00\x00"))


def test_header_length_beyond_file_and_over_limit(tmp_path) -> None:
    assert "header length 100 is beyond the end of the file (12 bytes)" in _message(
        _file(tmp_path, "a.safetensors", struct.pack("<Q", 100) + b"{}  "))
    assert "over the 100 MB limit" in _message(_file(tmp_path, "a.safetensors", struct.pack("<Q", 100_000_001)))
    assert "too short" in _message(_file(tmp_path, "a.safetensors", struct.pack("<Q", 1) + b"{"))


def test_header_not_json_not_object_not_utf8(tmp_path) -> None:
    assert "not valid JSON" in _message(_raw_file(tmp_path, None, raw=b"{'a': 1}"))
    assert "not an object (a list)" in _message(_raw_file(tmp_path, [1, 2]))
    assert "not UTF-8" in _message(_raw_file(tmp_path, None, raw=b'{"\xff":1}'))
    assert "not valid JSON" in _message(_raw_file(tmp_path, None, raw=b"[" * 50_000 + b"]" * 50_000))


def test_duplicate_names(tmp_path) -> None:
    e = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    assert "'a' appears twice" in _message(_raw_file(tmp_path, None, raw=f'{{"a":{e},"a":{e}}}'.encode(), data=b"x"))


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_offsets_overlap_gap_order_range(tmp_path) -> None:
    over = {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}
    assert "'b' overlaps" in _message(_raw_file(tmp_path, over, b"\0" * 12))
    gap = {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}
    assert "a gap of 4 bytes before tensor 'b'" in _message(_raw_file(tmp_path, gap, b"\0" * 20))
    backwards = {"a": _entry(offsets=(8, 0))}
    assert "out of order (ends at 0 before it begins at 8)" in _message(_raw_file(tmp_path, backwards, b"\0" * 8))
    huge = {"a": _entry(offsets=(0, 2**60))}
    assert "invalid data_offsets" in _message(_raw_file(tmp_path, huge, b"\0" * 8))
    neg = {"a": _entry(offsets=(-8, 0))}
    assert "invalid data_offsets" in _message(_raw_file(tmp_path, neg))
    # offsets given in any order in the header are fine as long as they tile the data
    fine = {"b": _entry(offsets=(8, 16)), "a": _entry(offsets=(0, 8))}
    with SafetensorsFile(_raw_file(tmp_path, fine, b"\0" * 16)) as f:
        assert f.keys() == ["b", "a"]


def test_truncated_and_trailing_bytes(tmp_path) -> None:
    header = {"a": _entry(shape=(4,), offsets=(0, 16)), "b": _entry(shape=(4,), offsets=(16, 32))}
    assert "truncated: 20 of 32 bytes of tensor data present" in _message(_raw_file(tmp_path, header, b"\0" * 20))
    assert "4 unexpected bytes after the tensor data" in _message(_raw_file(tmp_path, header, b"\0" * 36))


def test_shape_against_byte_range(tmp_path) -> None:
    header = {"a": _entry(shape=(3,), offsets=(0, 8))}
    assert "shape [3] and dtype F32 needs 12 bytes but its offsets span 8" in _message(
        _raw_file(tmp_path, header, b"\0" * 8))
    for bad_shape in ([-1], [1.5], ["2"], [True], [2**50], "2"):
        h = {"a": {"dtype": "F32", "shape": bad_shape, "data_offsets": [0, 8]}}
        assert "invalid shape" in _message(_raw_file(tmp_path, h, b"\0" * 8))


def test_bad_dtype_and_entry(tmp_path) -> None:
    assert "unknown dtype 'F128'" in _message(_raw_file(tmp_path, {"a": _entry(dtype="F128")}, b"\0" * 8))
    assert "unknown dtype None" in _message(_raw_file(tmp_path, {"a": {"shape": [], "data_offsets": [0, 0]}}))
    assert "entry 'a' is not an object" in _message(_raw_file(tmp_path, {"a": 3}))


@pytest.mark.parametrize("meta, what", [({"x": 1}, "number"), ({"x": None}, "null"), ({"x": {"y": "z"}}, "object"),
                                        ({"x": ["a"]}, "list"), ({"x": True}, "boolean")])
def test_non_string_metadata(tmp_path, meta, what) -> None:
    assert f"metadata value of 'x' is a {what}, not a string" in _message(_raw_file(tmp_path, {"__metadata__": meta}))


def test_metadata_not_object(tmp_path) -> None:
    assert "__metadata__ is not an object" in _message(_raw_file(tmp_path, {"__metadata__": "x"}))


def test_not_a_file(tmp_path) -> None:
    with pytest.raises(SafetensorsError, match="no such file"):
        SafetensorsFile(tmp_path / "missing.safetensors")
    with pytest.raises(SafetensorsError, match="is a folder"):
        SafetensorsFile(tmp_path)


def test_missing_tensor_is_our_error_and_a_key_error(tmp_path) -> None:
    p = _file(tmp_path, "a.safetensors", st_save({"w": torch.zeros(2)}))
    with SafetensorsFile(p) as f:
        with pytest.raises(MissingTensor, match="no tensor named 'v'") as e:
            f.get("v")
        assert isinstance(e.value, KeyError) and isinstance(e.value, LoraToolError)


# -- lifetime: closed files, handles, changed files ------------------------------------------------

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to count handles")
def test_no_handle_leaks_over_many_files(tmp_path) -> None:
    good = _file(tmp_path, "g.safetensors", st_save({"w": torch.arange(10.0)}))
    bad = _file(tmp_path, "b.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    gc.collect()
    before = _open_fds()
    for _ in range(300):
        with SafetensorsFile(good) as f:
            assert float(f.get("w").sum()) == 45.0
        with pytest.raises(SafetensorsError):
            SafetensorsFile(bad)
        read_metadata(good)
        load_file(good)
        f = SafetensorsFile(good)  # never closed explicitly: garbage collection must release it
        f.get("w")
        del f
    gc.collect()
    assert _open_fds() <= before


def test_tensors_outlive_close_and_get_after_close_is_our_error(tmp_path) -> None:
    p = _file(tmp_path, "a.safetensors", st_save({"w": torch.arange(6.0).reshape(2, 3)}))
    f = SafetensorsFile(p)
    t = f.get("w")
    f.close()
    del f
    gc.collect()
    assert torch.equal(t, torch.arange(6.0).reshape(2, 3))  # the map lives as long as the view
    f = SafetensorsFile(p)
    f.close()
    assert f.closed
    with pytest.raises(SafetensorsError, match="closed"):
        f.get("w")
    with pytest.raises(SafetensorsError, match="closed"):
        f.raw_data()


def test_file_shrunk_while_open_is_refused_not_a_crash(tmp_path) -> None:
    p = _file(tmp_path, "a.safetensors", st_save({"w": torch.zeros(4096)}))
    with SafetensorsFile(p) as f:
        with open(p, "r+b") as fh:
            fh.truncate(100)
        with pytest.raises(SafetensorsError, match="changed size"):
            f.get("w")


# -- torch-free headers, positional reads ----------------------------------------------------------

def test_header_reader_imports_without_torch(tmp_path) -> None:
    """inspect, planning and --help read headers only: that path must not pay torch's import."""
    import subprocess
    import sys
    from pathlib import Path

    p = _file(tmp_path, "a.safetensors", st_save({"w": torch.zeros(2, 3, dtype=torch.float16)}, {"k": "v"}))
    code = ("import sys\n"
            "from loratool.io.safetensors import SafetensorsFile\n"
            "from loratool.io.sources import open_source\n"
            f"f = SafetensorsFile({str(p)!r})\n"
            "assert f.keys() == ['w'] and f.info('w').dtype == 'F16' and f.shape('w') == (2, 3)\n"
            "assert f.metadata == {'k': 'v'} and f.nbytes('w', (0, 1)) == 6\n"
            f"s = open_source({str(p)!r})\n"
            "assert s.shapes() == {'w': (2, 3)} and s.dtype_name('w') == 'F16'\n"
            "print('torch' in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "False"


def test_row_ranges_into_a_callers_buffer(tmp_path) -> None:
    w = torch.arange(60, dtype=torch.float32).reshape(12, 5)
    c = torch.arange(2 * 3 * 3 * 3, dtype=torch.float16).reshape(2, 3, 3, 3)
    p = _file(tmp_path, "a.safetensors", st_save({"w": w, "c": c}))
    buf = torch.zeros(256, dtype=torch.uint8)
    with SafetensorsFile(p) as f:
        assert f.nbytes("w") == 240 and f.nbytes("w", (4, 8)) == 80
        rows = f.read("w", (4, 8), out=buf)
        assert torch.equal(rows, w[4:8]) and rows.data_ptr() == buf.data_ptr()  # a view of the buffer
        assert torch.equal(f.read("w", (12, 12)), w[12:12])
        assert torch.equal(f.read("c", (1, 2)), c[1:2])
        assert torch.equal(f.read("w"), w)
        for bad in ((5, 4), (0, 13), (-1, 2)):
            with pytest.raises(SafetensorsError, match="cannot read rows"):
                f.read("w", bad)
        with pytest.raises(ValueError, match="uint8 buffer of 80 bytes"):
            f.read("w", (4, 8), out=torch.zeros(79, dtype=torch.uint8))
        with pytest.raises(ValueError):
            f.read("w", (4, 8), out=torch.zeros(80, dtype=torch.float32))


def test_positional_reads_never_map_the_file(tmp_path, monkeypatch) -> None:
    """read() (what extract and merge use on big checkpoints) leaves nothing mapped in the process."""
    import mmap as mmap_mod

    def refuse(*a, **k):
        raise AssertionError("the reader memory-mapped the file")

    monkeypatch.setattr(mmap_mod, "mmap", refuse)
    tensors = {"a": _random(torch.bfloat16, (7, 9)), "b": _random(torch.int64, (3,))}
    p = _file(tmp_path, "a.safetensors", st_save(tensors))
    assert {k: _bits(v) for k, v in load_file(p).items()} == {k: _bits(v) for k, v in tensors.items()}


def test_dtype_tables_are_built_lazily_and_agree() -> None:
    from loratool.io import dtypes

    assert set(dtypes.BITS) == set(DTYPES)
    assert all(bits == DTYPES[name][1] for name, bits in dtypes.BITS.items())
    assert dtypes.names_by_torch()[torch.bfloat16] == "BF16" and dtypes.torch_dtype("F8_E4M3") == torch.float8_e4m3fn
    assert dtypes.FLOAT_NAMES == {n for n, (t, _) in DTYPES.items() if t is not None and t.is_floating_point}


def test_a_header_parsed_again_comes_from_memory_as_fresh_dicts(tmp_path) -> None:
    """An extraction opens both models to plan and again to read: the second parse of the same bytes is
    remembered, but each opener gets dicts of its own, and a file whose size changed is checked anew."""
    from loratool.io import header

    path = tmp_path / "a.safetensors"
    path.write_bytes(st_save({"w": torch.ones(2, 3)}, {"k": "v"}))
    with SafetensorsFile(path) as f:
        f.tensors.pop("w")
        f.metadata["k"] = "changed"
    calls = []
    real = header._parse_header
    header._parse_header = lambda *a: calls.append(a) or real(*a)
    try:
        with SafetensorsFile(path) as g:
            assert list(g.tensors) == ["w"] and g.metadata == {"k": "v"}
        assert calls == []  # remembered
        with open(path, "ab") as fh:
            fh.write(b"\0" * 4)  # the same header over trailing bytes: parsed again, and refused
        with pytest.raises(SafetensorsError, match="unexpected bytes after the tensor data"):
            SafetensorsFile(path)
        assert len(calls) == 1
    finally:
        header._parse_header = real


def test_an_extent_is_the_bytes_a_read_of_the_same_rows_returns(tmp_path):
    """What the OS is told to fetch ahead is exactly what a read of those rows reads."""
    from loratool.io.safetensors import SafetensorsFile
    from loratool.io.sources import open_source
    from loratool.io.writer import write_safetensors

    p = tmp_path / "w.safetensors"
    write_safetensors(p, {"a": torch.zeros(4, 3), "b": torch.arange(30, dtype=torch.float16).reshape(10, 3)}, None)
    raw = p.read_bytes()
    with SafetensorsFile(p) as f:
        for rows in ((2, 5), None, (4, 4)):
            off, n = f.extent("b", rows)
            assert raw[off:off + n] == f.read("b", rows).numpy().tobytes()
        assert f.extent("b", (4, 4))[1] == 0
    with open_source(p) as src:
        assert src.extent("a") == (str(p), *SafetensorsFile(p).extent("a"))
