"""How a command's process ends once torch is loaded (``loratool.cli.main.leave``): at once, but only after
what a normal exit does that matters — other threads finished, atexit handlers run, streams flushed."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, sys, threading, time
import torch
from loratool.cli.main import leave

def late(path):
    time.sleep(0.3)
    open(path, "w").write("done")

threading.Thread(target=late, args=(sys.argv[1],)).start()
atexit.register(lambda: print("atexit ran"))
sys.stdout.write("unflushed line")
leave(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
print("never printed")
"""


@pytest.mark.parametrize("code,status", [("0", 0), ("3", 3), ("a message", 1)])
def test_leave_finishes_threads_runs_atexit_flushes_and_keeps_the_status(tmp_path, code, status):
    flag = tmp_path / "thread.txt"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(flag), code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status, proc.stderr
    assert flag.read_text() == "done"
    assert proc.stdout.startswith("unflushed line") and "atexit ran" in proc.stdout
    assert "never printed" not in proc.stdout
    if status == 1:
        assert "a message" in proc.stderr


def test_a_command_that_loads_torch_writes_its_output_and_exits_zero(repo_root, tmp_path):
    out = tmp_path / "lora"
    proc = subprocess.run([sys.executable, "-m", "loratool", "extract", "fixtures/tiny_base.safetensors",
                           "fixtures/tiny_tuned.safetensors", "-r", "4", "-o", str(out), "--json"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("}") and '"modules"' in proc.stdout  # the JSON came out whole
    assert (out / "adapter_model.safetensors").is_file()
