"""mix --device cuda and merge --device cuda give what the CPU gives (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratool.core.modules import Adapter, Dora, LoraModule
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors
from loratool.ops.merge_stream import merge_checkpoint
from loratool.ops.mix import MixInput, mix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _adapter(seed: int, rank: int, dora: bool = False) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    a = Adapter(base_model="unknown")
    for name, (o, i) in {"a": (64, 48), "b": (96, 96)}.items():
        m = LoraModule(component="model", path=name, alpha=rank / 2, down=torch.randn(rank, i, generator=g),
                       up=torch.randn(o, rank, generator=g))
        if dora and name == "b":
            m.dora = Dora(torch.rand(o, 1, generator=g) + 0.5, "out")
        a.add(m)
    return a


def test_mix_on_cuda_matches_cpu() -> None:
    inputs = [MixInput(_adapter(1, 8), 0.7), MixInput(_adapter(2, 4), -0.4)]
    for mode in ("concat", "svd"):
        cpu = mix(inputs, mode=mode, rank=6)
        gpu = mix(inputs, mode=mode, rank=6, device="cuda")
        for key, m in cpu.adapter.modules.items():
            d_cpu, d_gpu = m.delta(torch.float64), gpu.adapter.modules[key].delta(torch.float64)
            assert float((d_cpu - d_gpu).norm() / d_cpu.norm()) < 1e-4, (mode, key)


def test_merge_on_cuda_matches_cpu(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "m.safetensors"
    write_safetensors(src, {"a.weight": torch.randn(64, 48, generator=g).half(),
                            "b.weight": torch.randn(96, 96, generator=g).half(), "c": torch.ones(3)})
    inputs = [MixInput(_adapter(3, 4), 0.5), MixInput(_adapter(4, 2, dora=True), 1.0)]
    merge_checkpoint(src, inputs, tmp_path / "cpu.safetensors", arch="generic")
    merge_checkpoint(src, inputs, tmp_path / "gpu.safetensors", arch="generic", device=torch.device("cuda"))
    with SafetensorsFile(tmp_path / "cpu.safetensors") as a, SafetensorsFile(tmp_path / "gpu.safetensors") as b:
        for k in a.keys():
            assert torch.allclose(a.get(k).float(), b.get(k).float(), atol=2e-3), k
