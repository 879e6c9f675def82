"""Seeded, small generators of hostile and broken inputs, and the checks every command must pass on them.

Files are written with the ``safetensors`` package or by hand (raw headers), never through loratool, so a
bug in loratool's writer cannot hide one in its reader. ``check_refused`` is the one-line contract of the
issue: exit 1, one ``loratool: error: <file>: …`` line on stderr and nothing else there, no internal error,
no output written, no temporaries left, and every input byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

import loratool
from loratool.cli.main import cli
from loratool.io.output import TEMP_TAG

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "fixtures" / "real"
CODE = Path(loratool.__file__).resolve().parents[1]  # the loratool under test (child processes import it)

# an SD1 kohya LoRA: two attention modules, one conv (names are the family's; shapes are SD1's)
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
SHAPES = {Q: (320, 320), K: (320, 320), CONV: (320, 320, 3, 3)}


def kohya_tensors(seed: int = 0, rank: int = 4, alpha: float = 4.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A small valid kohya LoRA as tensors (LoCon for the conv)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        out[f"{name}.lora_down.weight"] = (torch.randn(rank, *shape[1:], generator=g) * 0.1).to(dtype)
        up = (rank, 1, 1) if len(shape) == 4 else (rank,)
        out[f"{name}.lora_up.weight"] = (torch.randn(shape[0], *up, generator=g) * 0.1).to(dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def save(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata is not None else None)
    return path


def raw_header(header: Mapping[str, object], data: bytes = b"") -> bytes:
    """The bytes of a safetensors file with this exact header (``json.dumps``: ASCII, escapes kept)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def rewrite_header(src: Path, dst: Path, change) -> Path:
    """``dst``: ``src`` with its header passed through ``change(dict) -> dict`` (data kept)."""
    blob = src.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    dst.write_bytes(raw_header(change(header), blob[8 + n:]))
    return dst


def peft_folder(folder: Path, config: Mapping[str, object], seed: int = 0) -> Path:
    """A peft adapter folder of one SD1 attention module with this ``adapter_config.json``."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save(folder / "adapter_model.safetensors", {f"{base}.lora_A.weight": torch.randn(4, 320, generator=g),
                                                 f"{base}.lora_B.weight": torch.randn(320, 4, generator=g)})
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def model_pair(folder: Path, seed: int = 0, change=None) -> tuple[Path, Path]:
    """A tiny generic base/tuned checkpoint pair for ``extract --arch generic`` (``change`` edits tuned)."""
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(16, 8, generator=g), "b.weight": torch.randn(16, 8, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    if change is not None:
        tuned = change(tuned)
    return save(folder / "base.safetensors", base), save(folder / "tuned.safetensors", tuned)


# -- running commands and checking the contract ---------------------------------------------------


def invoke(*args: object) -> Result:
    """The CLI in this process (fast): stdout and stderr apart."""
    return CliRunner().invoke(cli, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args])


def run_process(*args: object, timeout: float = 60, env: Mapping[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    """The CLI in a child process (for what would hang or kill: FIFOs, signals)."""
    return subprocess.run([sys.executable, "-m", "loratool", *map(os.fspath, map(str, args))],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(CODE), **(env or {})})


def snapshot(paths: Iterable[Path]) -> dict[str, bytes | None]:
    """The bytes of each file (every file under a folder); None for what does not exist."""
    out: dict[str, bytes | None] = {}
    for p in paths:
        if p.is_dir():
            out.update({str(f): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()})
        elif p.is_file():
            out[str(p)] = p.read_bytes()
        else:
            out[str(p)] = None
    return out


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if TEMP_TAG in p.name)


def one_error_line(stderr: str, notes: bool = False) -> str:
    """The stderr of a refused command: exactly one ``loratool: error:`` line, no internal error (after
    ``loratool: note:`` lines printed before the work began, where ``notes``)."""
    lines = stderr.strip("\n").split("\n")
    while notes and len(lines) > 1 and lines[0].startswith("loratool: note: "):
        lines.pop(0)
    assert len(lines) == 1 and lines[0].startswith("loratool: error: "), stderr
    assert "internal error" not in lines[0] and "Traceback" not in stderr, stderr
    return lines[0]


def check_refused(result, *, inputs: Iterable[Path], outputs: Iterable[Path] = (), before: dict | None = None,
                  names: Iterable[str] = (), notes: bool = False) -> str:
    """Exit 1, one error line (naming each of ``names``), no output, no temporaries, inputs untouched."""
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    stderr = result.stderr
    assert code == 1, (code, stderr, getattr(result, "stdout", ""))
    line = one_error_line(stderr, notes)
    for name in names:
        assert name in line, (name, line)
    for out in outputs:
        assert not os.path.lexists(out), out
    inputs = list(inputs)
    if before is not None:
        assert snapshot(inputs) == before
    for folder in {Path(p).parent for p in [*inputs, *outputs]}:
        assert temporaries(folder) == [], folder
    return line
