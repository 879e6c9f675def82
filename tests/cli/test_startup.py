"""``--help``, ``inspect`` (headers) and ``ratio`` never import torch: each runs in a fresh interpreter, which
then reports whether torch is in ``sys.modules``. (How fast they start is bench/startup.py's table.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, runpy, sys
import loratool.cli.main
loratool.cli.main.leave = sys.exit  # the probe must outlive a command that loads torch
sys.argv = ["loratool", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("loratool", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
sys.stdout.flush()
print("\\nPROBE", json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def run_fresh(repo_root, *args: str) -> tuple[dict, str]:
    """(exit code and whether torch was imported, stdout) of ``loratool ARGS`` in a new interpreter."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    out, _, probe = proc.stdout.rpartition("\nPROBE ")
    assert probe, proc.stderr
    return json.loads(probe), out


@pytest.fixture(scope="module")
def lora(repo_root):
    return repo_root / "fixtures" / "example_sd15_kohya.safetensors"


@pytest.mark.parametrize("args", [
    ["--help"], ["inspect", "--help"], ["extract", "--help"], ["train", "--help"], ["mix", "--help"],
    ["ratio", "--model", "sdxl", "--targets", "transformer", "-r", "8", "16"], ["ratio", "--shape", "320x320"],
], ids=lambda a: " ".join(a))
def test_help_and_ratio_import_no_torch(repo_root, args):
    probe, out = run_fresh(repo_root, *args)
    assert probe == {"code": 0, "torch": False}, out
    assert out.strip()


@pytest.mark.parametrize("extra", [[], ["--json"], ["--no-hash"]])
def test_inspect_reads_headers_without_torch(repo_root, lora, extra):
    probe, out = run_fresh(repo_root, "inspect", lora, *extra)
    assert probe == {"code": 0, "torch": False}, out
    assert "sd1" in out


def test_ratio_of_a_file_reads_its_header_without_torch(repo_root, lora):
    probe, out = run_fresh(repo_root, "ratio", lora, "--json")
    assert probe == {"code": 0, "torch": False}, out
    assert json.loads(out)["total"]["modules"] == 24


def test_inspect_modules_reads_tensors(repo_root, lora):
    """The probe can fail: asking for ‖ΔW‖_F reads the tensors, and that imports torch."""
    probe, out = run_fresh(repo_root, "inspect", lora, "--modules", "--json")
    assert probe == {"code": 0, "torch": True}, out
