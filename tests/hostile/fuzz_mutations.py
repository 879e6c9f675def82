"""Seeded mutations of real adapter files: what a fuzzer would try against the header, the tensor names,
shapes, dtypes, offsets, the metadata and the data (issue 14).

``mutant(blob, rng)`` returns new file bytes and a short description of what was changed; the same seed
gives the same mutant. Headers are rewritten with ``json.dumps`` (or spliced as raw text, for what JSON
libraries will not write: duplicate keys, bad escapes), never through loratool.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "X9", ""]
WEIRD_VALUES = ["NaN", "Infinity", "-inf", "1e400", "-0", "9" * 400, "\ud800", "[" * 5000 + "]" * 5000,
                '{"a": NaN}', '{"x": 1e999}', "", "\n\r\t\x00", "é" * 1000, "0x10", "null", "true"]


def split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header: dict | str, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# -- one mutation each: (header, data, rng) -> (header or raw header text, data, what) -----------------


def _dtype(h, d, rng):
    k = rng.choice(_tensor_names(h))
    h[k]["dtype"] = rng.choice(DTYPES)
    return h, d, f"dtype of {k} -> {h[k]['dtype']}"


def _shape(h, d, rng):
    k = rng.choice(_tensor_names(h))
    shape = list(h[k]["shape"])
    how = rng.choice(["swap", "drop", "add", "zero", "huge", "negative", "float", "string", "scalar"])
    if how == "swap" and len(shape) > 1:
        shape[0], shape[-1] = shape[-1], shape[0]
    elif how == "drop" and shape:
        shape.pop()
    elif how == "add":
        shape.append(1)
    elif how == "zero" and shape:
        shape[rng.randrange(len(shape))] = 0
    elif how == "huge":
        shape = [2 ** 62, 2 ** 62]
    elif how == "negative" and shape:
        shape[0] = -shape[0]
    elif how == "float" and shape:
        shape[0] = shape[0] + 0.5
    elif how == "string" and shape:
        shape[0] = str(shape[0])
    elif how == "scalar":
        shape = []
    h[k]["shape"] = shape
    return h, d, f"shape of {k} ({how}) -> {shape}"


def _offsets(h, d, rng):
    k = rng.choice(_tensor_names(h))
    a, b = h[k]["data_offsets"]
    how = rng.choice(["shift", "swap", "past_end", "overlap", "negative", "short"])
    new = {"shift": [a + 1, b + 1], "swap": [b, a], "past_end": [a, len(d) + 1024], "overlap": [0, b - a],
           "negative": [-8, b], "short": [a, max(a, b - 1)]}[how]
    h[k]["data_offsets"] = new
    return h, d, f"offsets of {k} ({how}) -> {new}"


def _rename(h, d, rng):
    k = rng.choice(_tensor_names(h))
    how = rng.choice(["suffix", "swap_role", "strip", "prefix", "empty", "dots", "surrogate", "long"])
    new = {"suffix": k + ".extra", "swap_role": k.replace("up", "down") if "up" in k else k.replace("down", "up"),
           "strip": k.rsplit(".", 1)[0], "prefix": "junk." + k, "empty": "", "dots": "." * 10,
           "surrogate": k[:5] + "\udc80" + k[5:], "long": k * 50}[how]
    h[new] = h.pop(k)
    return h, d, f"rename {k} ({how})"


def _delete(h, d, rng):
    k = rng.choice(_tensor_names(h))
    del h[k]
    return h, d, f"delete {k}"


def _duplicate(h, d, rng):
    k = rng.choice(_tensor_names(h))
    text = json.dumps(h)
    entry = json.dumps({k: h[k]})[1:-1]
    return text[:-1] + ", " + entry + "}", d, f"duplicate key {k}"


def _metadata(h, d, rng):
    meta = dict(h.get("__metadata__") or {})
    key = rng.choice(sorted(meta) + ["ss_network_alpha", "ss_network_dim", "ss_tag_frequency",
                                     "lora_adapter_metadata", "modelspec.architecture", "ss_base_model_version"])
    how = rng.choice(["weird", "number", "list", "null"])
    value = {"weird": rng.choice(WEIRD_VALUES), "number": 3, "list": ["a"], "null": None}[how]
    meta[key] = value
    h["__metadata__"] = meta if rng.random() < 0.9 else ["not", "a", "dict"]
    return h, d, f"metadata {key} ({how})"


def _tensor_header(h, d, rng):
    k = rng.choice(_tensor_names(h))
    h[k] = rng.choice([None, [], "x", 7, {}, {"dtype": "F32"}, {**h[k], "extra": 1}])
    return h, d, f"header entry of {k} -> {h[k]!r}"


def _data(h, d, rng):
    """Write NaN/inf/huge bit patterns into one tensor's data (the header stays valid)."""
    k = rng.choice(_tensor_names(h))
    a, b = h[k]["data_offsets"]
    size = {"F32": 4, "F16": 2, "BF16": 2}.get(h[k]["dtype"])
    if size is None or b - a < size:
        return h, d, f"data of {k} left"
    pattern = {4: [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f"],
               2: [b"\x00\x7e", b"\x00\x7c", b"\xff\x7b", b"\xc0\x7f", b"\x80\x7f"]}[size]
    buf = bytearray(d)
    at = a + size * rng.randrange((b - a) // size)
    buf[at:at + size] = rng.choice(pattern)
    return h, bytes(buf), f"data of {k} at {at - a}: non-finite or huge"


HEADER_MUTATIONS: list[Callable] = [_dtype, _shape, _offsets, _rename, _delete, _duplicate, _metadata,
                                    _tensor_header, _data]


def _raw(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Byte-level damage: a header length out of range, a flipped byte in the header, a cut file."""
    n = struct.unpack("<Q", blob[:8])[0]
    how = rng.choice(["length", "flip", "cut"])
    if how == "length":
        new = rng.choice([0, 1, n - 1, n + 8, len(blob), 2 ** 63, 2 ** 64 - 1])
        return struct.pack("<Q", new) + blob[8:], f"header length -> {new}"
    if how == "flip":
        at = 8 + rng.randrange(n)
        return blob[:at] + bytes([blob[at] ^ (1 << rng.randrange(8))]) + blob[at + 1:], f"bit flip at {at}"
    cut = rng.randrange(len(blob))
    return blob[:cut], f"cut at {cut} of {len(blob)}"


def mutant(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One to three seeded mutations of a safetensors file's bytes."""
    if rng.random() < 0.2:
        return _raw(blob, rng)
    header, data = split(blob)
    done = []
    text: dict | str = header
    for _ in range(rng.choice([1, 1, 2, 3])):
        if isinstance(text, str) or not _tensor_names(text):
            break
        text, data, what = rng.choice(HEADER_MUTATIONS)(text, data, rng)
        done.append(what)
    return join(text, data), "; ".join(done)
