"""Data parallel training (torchrun, two CPU processes over gloo) takes the steps of one process with the
doubled batch; process 0 alone writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratool.io.safetensors import SafetensorsFile
from loratool.train.parallel import Parallel

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "fixtures" / "tiny-sd"
INSTANCE = REPO / "fixtures" / "tiny-instance"


def test_each_process_keeps_its_share_of_instance_and_class_rows():
    assert Parallel(0, 2).rows(3, prior=True).tolist() == [0, 1, 2, 6, 7, 8]
    assert Parallel(1, 2).rows(3, prior=True).tolist() == [3, 4, 5, 9, 10, 11]
    assert Parallel(1, 2).rows(3, prior=False).tolist() == [3, 4, 5]
    assert Parallel().rows(2, prior=True).tolist() == [0, 1, 2, 3]


def _train(out: Path, batch: int, class_dir: Path, processes: int = 1) -> subprocess.CompletedProcess:
    args = ["train", "--model", str(MODEL), "--instance-data", str(INSTANCE), "--instance-prompt", "a sks shape",
            "--class-data", str(class_dir), "--class-prompt", "a shape", "--num-class-images", "3",
            "--targets", "unet,text_encoder", "-r", "4", "--steps", "3", "--lr", "1e-3", "--resolution", "16",
            "--snr-gamma", "5", "--noise-offset", "0.1", "--batch-size", str(batch), "--device", "cpu", "--json",
            "-o", str(out)]
    launcher = [sys.executable, "-m", "loratool"]
    if processes > 1:
        # --standalone: torchrun picks a free port itself (no race for one between finding and binding it)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    "-m", "loratool"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(launcher + args, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_doubled_batch(tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(3):
        shutil.copy(INSTANCE / f"sks_{i + 2}.png", class_dir / f"c{i}.png")
    one = _train(tmp_path / "one", 2, class_dir)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _train(tmp_path / "two", 1, class_dir, processes=2)
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
    assert two.stdout.count('"steps": 3') == 1, two.stdout  # one summary: process 0's
    summary = json.loads(two.stdout[two.stdout.index("{"):])
    assert summary["processes"] == 2 and summary["examples_per_step"] == 2
    losses = [json.loads((tmp_path / run / "losses.json").read_text()) for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4), losses
    files = [SafetensorsFile(tmp_path / run / "lora.safetensors") for run in ("one", "two")]
    assert set(files[0].keys()) == set(files[1].keys())
    for key in files[0].keys():
        a, b = files[0].get(key).double(), files[1].get(key).double()
        assert float((a - b).norm()) <= 1e-3 * float(a.norm()) + 1e-8, key
    assert torch.isfinite(torch.tensor(losses[1])).all()
