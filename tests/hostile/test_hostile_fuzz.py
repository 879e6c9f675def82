"""A seeded fuzzer over the real adapters of ../shared/fixtures/real/adapters (issue 14).

Each seed picks a real file, damages its header, names, shapes, dtypes, offsets, metadata or data
(``fuzz_mutations``), and runs inspect, convert, scale and resize on it. Every run must end in exit 0 with a
complete output whose tensors are all finite, or in the one-line contract (exit 1, one ``loratool: error:``
line naming the file, no output, no temporaries); never an internal error or a traceback; the mutant is
byte-identical afterwards. ``python tests/hostile/test_hostile_fuzz.py N [FIRST]`` runs N seeds and prints
each failure (for longer hunts than the suite's).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from fuzz_mutations import mutant
from hostile_inputs import REAL, check_refused, invoke, snapshot, temporaries
from safetensors import safe_open

ADAPTERS = sorted((REAL / "adapters").glob("*.safetensors")) if REAL.is_dir() else []
SEEDS = [*range(20), 28, 109, 162, 435]  # the suite's share, with seeds that found bugs; the script runs any number


def _commands(src: Path, out: Path) -> dict[str, list]:
    return {"inspect": ["inspect", "--json", src], "convert": ["convert", src, "--to", "kohya", "-o", out],
            "scale": ["scale", src, "0.5", "-o", out], "resize": ["resize", src, "-r", "2", "-o", out]}


def _check_written(out: Path) -> None:
    with safe_open(str(out), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            assert not t.is_floating_point() or bool(torch.isfinite(t.float()).all()), (out, key)


def check_seed(seed: int, folder: Path) -> None:
    rng = random.Random(seed)
    source = rng.choice(ADAPTERS)
    blob, what = mutant(source.read_bytes(), rng)
    src = folder / f"mutant{seed}.safetensors"
    src.write_bytes(blob)
    before = snapshot([src])
    for name, args in _commands(src, folder / "out.safetensors").items():
        out = folder / "out.safetensors"
        result = invoke(*args)
        context = (seed, source.name, what, name, result.exit_code, result.stderr[-600:])
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr, context
        if result.exit_code == 0:
            if name == "inspect":
                json.loads(result.stdout)
            else:
                _check_written(out)
                out.unlink()
        else:
            written = "refusing to write a non-finite result" in result.stderr  # NaN data: named at the write
            check_refused(result, inputs=[src], outputs=[out], before=before, notes=True,
                          names=[out.name if written else src.name])
        assert snapshot([src]) == before and temporaries(folder) == [], context


@pytest.mark.skipif(not ADAPTERS, reason="../shared/fixtures/real is absent")
@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_real_adapters_keep_the_contract(seed, tmp_path) -> None:
    check_seed(seed, tmp_path)


if __name__ == "__main__":
    count, first = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0
    failed = 0
    for s in range(first, first + count):
        with tempfile.TemporaryDirectory() as d:
            try:
                check_seed(s, Path(d))
            except AssertionError as e:
                failed += 1
                print(f"seed {s}: {str(e)[:900]}\n")
    print(f"{failed} of {count} seeds failed")
