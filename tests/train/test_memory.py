"""The dry run's memory prediction: the trace's bookkeeping, the emulated autocast, and that the estimate
moves the way the settings say (its accuracy is measured on a GPU by bench/train_speed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.train.config import TrainConfig
from loratool.train.memory import estimate
from loratool.train.trace import EmulatedAutocast, MemoryTrace

REPO = Path(__file__).resolve().parents[2]


def config(**kw) -> TrainConfig:
    base = dict(model=str(REPO / "fixtures" / "tiny-sd"), instance_data=str(REPO / "fixtures" / "tiny-instance"),
                instance_prompt="a sks shape", output="unused", rank=4, resolution=16, mixed_precision="fp16")
    base.update(kw)
    return TrainConfig(**base)


def test_the_trace_counts_each_storage_once_until_it_is_freed():
    keep = torch.empty(10, device="meta")
    with MemoryTrace([keep]) as trace:
        a = torch.empty(1000, device="meta")  # 4000 bytes: 4096 counted
        view = a[:10]  # noqa: F841 - a view adds nothing
        _ = keep.view(2, 5)  # nor does a view of what existed before
        b = torch.empty(100, device="meta")  # 512
        assert trace.live == 4096 + 512
        del a, view, b
        c = torch.empty(10, device="meta")  # noqa: F841
    assert trace.peak == 4096 + 512 and trace.live == 512


def test_the_emulated_autocast_casts_as_cuda_autocast_does():
    x = torch.empty(2, 64, 32, device="meta")
    w = torch.empty(16, 32, device="meta")
    with EmulatedAutocast(torch.float16):
        assert F.linear(x, w).dtype == torch.float16
        assert F.layer_norm(x.half(), (32,)).dtype == torch.float32
        assert F.group_norm(x.half().transpose(1, 2), 4).dtype == torch.float32
        q = torch.empty(2, 4, 1024, 8, device="meta")
        out = F.scaled_dot_product_attention(q, q, q)
        assert out.dtype == torch.float16 and out.shape == q.shape


def test_the_estimate_follows_the_settings():
    one, four = estimate(config(batch_size=1)), estimate(config(batch_size=4))
    assert min(one.weights, one.adapter, one.step, one.setup) > 0 and one.optimizer == 2 * one.adapter
    assert four.step > 2 * one.step and four.weights == one.weights
    assert estimate(config(batch_size=4, gradient_checkpointing=True)).step < four.step
    assert estimate(config(batch_size=4, recompute_pointwise=True)).step < four.step
    uncached = estimate(config(cache=False))
    assert uncached.weights > one.weights and uncached.caches == 0 < one.caches  # VAE and text encoder stay
    assert estimate(config(rank=32)).adapter > one.adapter
    fp32 = estimate(config(mixed_precision="no"))
    assert fp32.weights > 1.8 * one.weights  # frozen weights in fp32, not fp16


def test_dry_run_prints_the_prediction_and_trains_nothing(tmp_path):
    out = tmp_path / "never"
    res = CliRunner().invoke(cli, ["train", "--model", str(REPO / "fixtures" / "tiny-sd"), "--instance-data",
                                   str(REPO / "fixtures" / "tiny-instance"), "--instance-prompt", "a sks shape",
                                   "--resolution", "16", "--mixed-precision", "fp16", "--dry-run", "--json",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["peak"] == max(report["training"], report["setup"]) > 0
    assert report["fits"]["8 GB"] is True and not out.exists()
    # neither saver asked for: what each would make of the peak (the step is smaller; setup may stay the peak)
    with_ = report["peak_with"]
    assert set(with_) == {"recompute_pointwise", "gradient_checkpointing"}
    assert all(report["setup"] <= v <= report["peak"] for v in with_.values()), (report, with_)
    assert with_["gradient_checkpointing"] < report["peak"] or report["setup"] == report["peak"]
