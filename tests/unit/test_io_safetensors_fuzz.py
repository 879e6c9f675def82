"""Fuzzing the reader: random bytes and mutated real headers raise SafetensorsError or read
correctly; nothing else escapes and nothing hangs (hypothesis deadline)."""

from __future__ import annotations

import json
import struct
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool.errors import SafetensorsError
from loratool.io.safetensors import DTYPES, SafetensorsFile

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=3), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

REAL_ADAPTERS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "real" / "adapters"


def _exercise(path: Path) -> None:
    """Open, read every tensor and the metadata; only our error may come out."""
    try:
        with SafetensorsFile(path) as f:
            keys = f.keys()
            for k in keys[:12] + keys[-12:]:  # real headers hold hundreds: a sample keeps it fast
                info = f.info(k)
                try:
                    t = f.get(k)
                except SafetensorsError:
                    continue
                assert t.numel() == info.numel and tuple(t.shape) == info.shape
                if t.numel():
                    t.reshape(-1)[0].item()  # touch the mapped memory
            assert all(isinstance(v, str) for v in f.metadata.values())
    except SafetensorsError as e:
        assert "\n" not in str(e)


@FUZZ
@given(blob=st.binary(max_size=600))
def test_random_bytes(tmp_path, blob: bytes) -> None:
    p = tmp_path / "r.safetensors"
    p.write_bytes(blob)
    _exercise(p)


@FUZZ
@given(body=st.binary(max_size=400), extra=st.integers(-3, 3), tail=st.binary(max_size=64))
def test_random_header_with_plausible_length(tmp_path, body: bytes, extra: int, tail: bytes) -> None:
    p = tmp_path / "r.safetensors"
    p.write_bytes(struct.pack("<Q", max(len(body) + extra, 0)) + body + tail)
    _exercise(p)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(FUZZ, max_examples=80)
@given(header=st.dictionaries(st.text(max_size=6), json_values, max_size=5), data=st.binary(max_size=64))
def test_random_json_headers(tmp_path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    p = tmp_path / "r.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    _exercise(p)


def _real_headers() -> list[tuple[bytes, int]]:
    """(header bytes including the length prefix, data size) of each real adapter."""
    out = []
    for path in sorted(REAL_ADAPTERS.glob("*.safetensors")):
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            out.append((struct.pack("<Q", n) + fh.read(n), path.stat().st_size - 8 - n))
    return out


REAL = _real_headers() if REAL_ADAPTERS.is_dir() else []
needs_real = pytest.mark.skipif(not REAL, reason=f"real adapters not found at {REAL_ADAPTERS}")


def _write_sparse(p: Path, head: bytes, data_size: int) -> None:
    """The header followed by a zero data region of the given size (sparse: no real bytes written)."""
    with open(p, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + max(data_size, 0))


@needs_real
def test_unmutated_real_headers_read(tmp_path) -> None:
    for i, (head, size) in enumerate(REAL):
        p = tmp_path / f"{i}.safetensors"
        _write_sparse(p, head, size)
        with SafetensorsFile(p) as f:
            assert len(f) > 0
        _exercise(p)


@needs_real
@FUZZ
@given(data=st.data())
def test_byte_mutations_of_real_headers(tmp_path, data) -> None:
    head, size = data.draw(st.sampled_from(REAL))
    b = bytearray(head)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = data.draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[pos:pos + data.draw(st.integers(1, 16))]
        else:
            b[pos] = data.draw(st.sampled_from(b'{}[]",:0123456789-. \x00\xff'))
    p = tmp_path / "m.safetensors"
    _write_sparse(p, bytes(b), size + data.draw(st.integers(-16, 16)))
    _exercise(p)


def _same_size_shapes(entry: dict) -> list:
    """Shapes of the same element count that are still invalid: the byte-count check alone passes."""
    shape = entry.get("shape")
    n = 1
    for s in shape if isinstance(shape, list) else []:
        n *= s if isinstance(s, int) else 1
    return [[-1, -n], [True, n], [float(n)], [n, 1.0], [str(n)], [n, None], [n, [1]], [2**48, 0, n]]


def _mutate_entry(entry: dict, data) -> None:
    field = data.draw(st.sampled_from(["dtype", "shape", "shape", "data_offsets", "drop", "extra"]))
    if field == "shape" and data.draw(st.booleans()):
        entry["shape"] = data.draw(st.sampled_from(_same_size_shapes(entry)))
    elif field == "dtype":
        entry["dtype"] = data.draw(st.sampled_from([*DTYPES, "F4", "f32", "", 7, None]))
    elif field == "shape":
        entry["shape"] = data.draw(st.lists(st.integers(-2, 2**50), max_size=5) | json_values)
    elif field == "data_offsets":
        entry["data_offsets"] = data.draw(st.lists(st.integers(-(2**64), 2**64), max_size=3) | json_values)
    elif field == "drop":
        entry.pop(data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    else:
        entry[data.draw(st.text(max_size=4))] = data.draw(json_values)


@needs_real
@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_json_mutations_of_real_headers(tmp_path, data) -> None:
    head, size = data.draw(st.sampled_from(REAL))
    header = json.loads(head[8:])
    names = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["entry", "entry", "metadata", "replace", "remove"]))
        name = data.draw(st.sampled_from(names))
        if what == "entry" and isinstance(header.get(name), dict):
            _mutate_entry(header[name], data)
        elif what == "metadata":
            header["__metadata__"] = data.draw(
                st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values)
        elif what == "replace":
            header[name] = data.draw(json_values)
        else:
            header.pop(name, None)
    raw = json.dumps(header).encode()
    p = tmp_path / "m.safetensors"
    _write_sparse(p, struct.pack("<Q", len(raw)) + raw, size)
    _exercise(p)


def test_fuzz_harness_sees_a_real_tensor(tmp_path) -> None:
    """The harness does read data: a valid file comes back with its values."""
    from loratool.io.writer import serialize

    p = tmp_path / "v.safetensors"
    p.write_bytes(serialize({"a": torch.arange(4, dtype=torch.int32)}))
    _exercise(p)
    with SafetensorsFile(p) as f:
        assert f.get("a").tolist() == [0, 1, 2, 3]
