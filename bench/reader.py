"""Benchmark: loratool's own safetensors reader beside the ``safetensors`` package (``safe_open``).

One command, one run, every number of both readers measured in it:

1. start-up + header: a fresh interpreter that imports the reader, opens a file and lists its keys
   (median wall time of ``--repeat`` runs, and whether torch got imported), on a real adapter and on
   a large synthetic checkpoint; ``safe_open`` with ``framework="pt"`` (what a torch caller uses)
   and ``"numpy"`` (its lightest);
2. reads of the large checkpoint, each way in its own process, the file read once just before (page
   cache warm): every tensor whole
   (a sparse touch of every page afterwards, so a lazily mapped tensor pays its page faults too) —
   ours by positional reads into new memory (``read``), ours as a view of a private map (``get``),
   the package's ``get_tensor`` — then the first third of the rows of every ≥2-D tensor (a q/k/v
   slice of a fused weight) into one preallocated buffer; throughput, peak RSS, and RSS after the
   reads with the file still open (what a memory map leaves resident);
3. strictness: the bad files of ../shared/fixtures/real/bad and hand-made malformed headers; per
   reader, whether it refuses the file with one line, crashes (a panic or a signal), or accepts it
   (opens it and reads every tensor without a word).

The large checkpoint has the SDXL single-file key table (../shared/fixtures/real/keyshapes/
sdxl_sgm_checkpoint_full.json, 2531 tensors), float tensors stored as ``--dtype`` (F8_E4M3 by
default: 3.2 GiB; F16: 6.5 GiB), random bytes; it is deleted at the end.

    python bench/reader.py [--dtype F8_E4M3|F16] [--repeat 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "fixtures" / "real"
ADAPTER = SHARED / "adapters" / "flux_aitoolkit_peft_r16.safetensors"
KEYTABLE = SHARED / "keyshapes" / "sdxl_sgm_checkpoint_full.json"
BYTES = {"F8_E4M3": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8}
READS = (("whole", "ours read"), ("whole", "ours get (map)"), ("whole", "safetensors"),
         ("rows", "ours read"), ("rows", "safetensors"))


# ------------------------------------------------------------------ the files


def write_checkpoint(path: Path, dtype: str) -> int:
    """The SDXL key table with random bytes, written in 64 MiB blocks (one random block reused)."""
    table = json.loads(KEYTABLE.read_text())
    header, offset = {}, 0
    for key, entry in table.items():
        dt = "I64" if entry["dtype"] == "int64" else dtype
        n = math.prod(entry["shape"]) * BYTES[dt]
        header[key] = {"dtype": dt, "shape": entry["shape"], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    block = os.urandom(1 << 26)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
    return path.stat().st_size


def _file(folder: Path, name: str, header: object, data: bytes = b"", raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    p = folder / name
    p.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return p


def _e(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def malformed(folder: Path) -> dict[str, Path]:
    """Hand-made defects a strict reader must refuse (reference/webui.md §8)."""
    e = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    cases = {
        "duplicate tensor name": _file(folder, "dup.safetensors", None, b"x", f'{{"a":{e},"a":{e}}}'.encode()),
        "overlapping tensors": _file(folder, "overlap.safetensors", {"a": _e(), "b": _e(offsets=(4, 12))}, b"\0" * 12),
        "gap between tensors": _file(folder, "gap.safetensors", {"a": _e(), "b": _e(offsets=(12, 20))}, b"\0" * 20),
        "bytes after the data": _file(folder, "trailing.safetensors", {"a": _e()}, b"\0" * 12),
        "data cut short": _file(folder, "short.safetensors", {"a": _e(shape=(4,), offsets=(0, 16))}, b"\0" * 8),
        "shape vs byte size": _file(folder, "size.safetensors", {"a": _e(shape=(3,))}, b"\0" * 8),
        "offsets backwards": _file(folder, "backwards.safetensors", {"a": _e(offsets=(8, 0))}, b"\0" * 8),
        "non-string metadata": _file(folder, "meta.safetensors", {"__metadata__": {"x": 1}}),
        "unknown dtype": _file(folder, "dtype.safetensors", {"a": _e(dtype="F128")}, b"\0" * 8),
        "negative shape": _file(folder, "neg.safetensors", {"a": _e(shape=(-2,))}, b"\0" * 8),
        "deeply nested JSON": _file(folder, "nested.safetensors", None, raw=b"[" * 50_000 + b"]" * 50_000),
    }
    eof = folder / "eof.safetensors"
    eof.write_bytes(struct.pack("<Q", 1000) + b'{"a":{}}')
    cases["header length past EOF"] = eof
    return cases


# ------------------------------------------------------------------ child processes

STARTUP = {
    "ours": "import sys; from loratool.io.safetensors import SafetensorsFile\n"
            "f = SafetensorsFile(sys.argv[1]); n = len(f.keys()); f.close()",
    "safetensors pt": "import sys; from safetensors import safe_open\n"
                      "f = safe_open(sys.argv[1], framework='pt'); n = len(f.keys())",
    "safetensors numpy": "import sys; from safetensors import safe_open\n"
                         "f = safe_open(sys.argv[1], framework='numpy'); n = len(f.keys())",
}
TAIL = "\nprint('torch' in sys.modules)"


def startup(path: Path, repeat: int) -> dict[str, tuple[float, bool]]:
    out = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, code in STARTUP.items():
        times, torch_in = [], False
        for _ in range(repeat):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code + TAIL, str(path)], capture_output=True, text=True,
                                  env=env, check=True)
            times.append(time.perf_counter() - t0)
            torch_in = proc.stdout.strip() == "True"
        out[name] = (statistics.median(times), torch_in)
    return out


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _touch(t) -> None:
    """One byte of every page, so that a lazily mapped tensor is really in memory."""
    import torch

    flat = t.reshape(-1).view(torch.uint8)
    if flat.numel():
        flat[::4096].sum()


def read_child(reader: str, mode: str, path: str) -> dict:
    """Read the checkpoint one way; return throughput and memory."""
    import torch

    ours = reader.startswith("ours")
    if ours:
        from loratool.io.safetensors import SafetensorsFile

        f = SafetensorsFile(path)
        keys = f.keys()
        shape = f.shape
    else:
        from safetensors import safe_open

        f = safe_open(path, framework="pt")
        keys = list(f.keys())

        def shape(k):
            return tuple(f.get_slice(k).get_shape())
    before = _status("VmRSS")
    if mode == "rows":
        keys = [k for k in keys if len(shape(k)) >= 2 and shape(k)[0] >= 3]
        buf = torch.empty(1 << 28, dtype=torch.uint8)  # the largest third of a tensor fits easily
    nbytes = 0
    t0 = time.perf_counter()
    for k in keys:
        if mode == "whole":
            t = f.read(k) if reader == "ours read" else f.get(k) if ours else f.get_tensor(k)
        elif ours:
            t = f.read(k, (0, shape(k)[0] // 3), out=buf)
        else:
            part = f.get_slice(k)[0:shape(k)[0] // 3]
            t = buf[:part.numel() * part.element_size()].view(part.dtype).reshape(part.shape)
            t.copy_(part)
        _touch(t)
        nbytes += t.numel() * t.element_size()
        del t
    wall = time.perf_counter() - t0
    return {"gib": nbytes / 2**30, "wall": wall, "rss_before": before, "rss_after": _status("VmRSS"),
            "peak": _status("VmHWM")}


def reads(path: Path) -> dict[tuple[str, str], dict]:
    out = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for mode, reader in READS:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # the page cache warm for each
        cmd = [sys.executable, __file__, "--read-child", reader, mode, str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{reader} {mode} failed:\n{proc.stderr[-3000:]}")
        out[(reader, mode)] = json.loads(lines[-1][7:])
    return out


STRICT = {
    "ours": "import sys; from loratool.io.safetensors import SafetensorsFile\n"
            "f = SafetensorsFile(sys.argv[1])\n"
            "for k in f.keys(): f.read(k)\n"
            "dict(f.metadata)",
    "safetensors": "import sys; from safetensors import safe_open\n"
                   "f = safe_open(sys.argv[1], framework='pt')\n"
                   "for k in f.keys(): f.get_tensor(k)\n"
                   "f.metadata()",
}


def verdict(reader: str, path: Path) -> str:
    """'refuses: <its line>', 'crashes: <how>' or 'accepts'."""
    code = STRICT[reader] + "\nprint('ACCEPTED')"
    wrapped = ("import traceback\ntry:\n" + "".join("    " + ln + "\n" for ln in code.splitlines())
               + "except BaseException as e:\n"
               "    kind = type(e).__name__\n"
               "    first = (str(e).splitlines() or [''])[0]\n"
               "    lines = len(str(e).splitlines())\n"
               "    print('ERROR', kind, lines, first[:150])\n")
    proc = subprocess.run([sys.executable, "-c", wrapped, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    text = proc.stdout.strip().replace(str(path), "‹file›").splitlines()
    if proc.returncode < 0:
        return f"crashes (signal {-proc.returncode})"
    if text and text[-1] == "ACCEPTED":
        return "accepts"
    if text and text[-1].startswith("ERROR "):
        _, kind, lines, *msg = text[-1].split(" ", 3)
        if kind in ("PanicException",) or "panicked" in " ".join(msg):
            return f"crashes (Rust panic: {' '.join(msg)[:80]})"
        what = "refuses" if kind in ("SafetensorsError", "MissingTensor", "SafetensorError") else f"{kind}"
        note = "" if lines == "1" else f" ({lines} lines)"
        return f"{what}{note}: {' '.join(msg)[:100]}"
    return f"crashes (exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:80] if proc.stderr else ''})"


def strictness(folder: Path) -> list[tuple[str, str, str]]:
    cases = {f"real: {p.name}": p for p in sorted((SHARED / "bad").iterdir()) if p.suffix == ".safetensors"}
    cases.update(malformed(folder))
    return [(name, verdict("ours", p), verdict("safetensors", p)) for name, p in cases.items()]


# ------------------------------------------------------------------ the tables


def render(start_adapter, start_ckpt, read_results, strict, size: int, dtype: str) -> str:
    import safetensors
    import torch

    load = os.getloadavg()[0]
    lines = [f"reader benchmark on {os.cpu_count()} CPUs, torch {torch.__version__}, safetensors "
             f"{safetensors.__version__}, load average {load:.1f} at the end; checkpoint: SDXL key table, "
             f"{size / 2**30:.2f} GiB ({dtype}), page cache warm", "",
             "### start-up + header (fresh interpreter: import, open, list keys; median)", "",
             "| reader | real adapter s | large checkpoint s | imports torch |", "| --- | --- | --- | --- |"]
    for name in STARTUP:
        lines.append(f"| {name} | {start_adapter[name][0]:.3f} | {start_ckpt[name][0]:.3f} | "
                     f"{'yes' if start_ckpt[name][1] else 'no'} |")
    lines += ["", "### reads of the large checkpoint (one process per row)", "",
              "| read | reader | GiB | s | GiB/s | RSS before GiB | RSS after, file open GiB | peak RSS GiB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (reader, mode), r in read_results.items():
        what = "every tensor whole" if mode == "whole" else "first ⅓ of rows → preallocated buffer"
        lines.append(f"| {what} | {reader} | {r['gib']:.2f} | {r['wall']:.2f} | {r['gib'] / r['wall']:.2f} | "
                     f"{r['rss_before']:.2f} | {r['rss_after']:.2f} | {r['peak']:.2f} |")
    lines += ["", "### strictness (open, read every tensor and the metadata)", "",
              "| file | ours | safetensors |", "| --- | --- | --- |"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in strict]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["F8_E4M3", "F16"], default="F8_E4M3")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--workdir", default=None)
    p.add_argument("--read-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.read_child:
        print("RESULT " + json.dumps(read_child(*args.read_child)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ckpt = Path(tmp) / "sdxl.safetensors"
        t0 = time.perf_counter()
        size = write_checkpoint(ckpt, args.dtype)
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
        start_adapter = startup(ADAPTER, args.repeat)
        start_ckpt = startup(ckpt, args.repeat)
        print("start-up done", flush=True)
        read_results = reads(ckpt)
        print("reads done", flush=True)
        strict = strictness(Path(tmp))
    print(render(start_adapter, start_ckpt, read_results, strict, size, args.dtype))


if __name__ == "__main__":
    main()
