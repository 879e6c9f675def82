"""The trainer's CUDA paths on fixtures/tiny-sd (skipped without CUDA): fp32, fp16 with the grad scaler and
bf16 autocast, with and without gradient checkpointing, learn on a fixed batch; fp32 on CUDA takes the same
loss and gradients as on the CPU; a resumed CUDA run continues the uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratool.train.config import TrainConfig
from loratool.train.loop import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")


def config(out: Path, **kw) -> TrainConfig:
    base = dict(model=str(REPO / "fixtures" / "tiny-sd"), instance_data=str(REPO / "fixtures" / "tiny-instance"),
                instance_prompt="a sks shape", output=str(out), rank=4, steps=2, lr=3e-3, batch_size=4,
                resolution=32, targets=("unet", "text_encoder"), unet_layers="transformer+conv", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def fixed_batch_losses(tr: Trainer, steps: int) -> list[float]:
    state = tr.gen.get_state()
    losses = []
    for _ in range(steps):
        tr.gen.set_state(state)  # same images, noise and timesteps every step
        losses.append(tr.step())
    return losses


@pytest.mark.parametrize("adapter", ["lora", "trilora"])
@pytest.mark.parametrize("precision,checkpointing", [("no", False), ("no", True), ("fp16", False),
                                                     ("bf16", True)])
def test_fixed_batch_loss_falls_on_cuda(tmp_path, adapter, precision, checkpointing):
    tr = Trainer(config(tmp_path, adapter=adapter, mixed_precision=precision,
                        gradient_checkpointing=checkpointing), CUDA)
    assert next(iter(tr.layers.values())).delta().device.type == "cuda"
    losses = fixed_batch_losses(tr, 6)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.995 * losses[0], losses
    if adapter == "lora" and precision == "no":  # TriLoRA's svd init (C = Σ) zigzags down at this lr
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


@pytest.fixture
def no_tf32():
    """CUDA convs default to TF32 (10-bit mantissa); the CPU comparison needs true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("adapter", ["lora", "trilora"])
def test_fp32_cuda_loss_and_gradients_equal_the_cpus(tmp_path, adapter, no_tf32):
    runs = {}
    for dev in ("cpu", "cuda"):
        tr = Trainer(config(tmp_path / dev, adapter=adapter), torch.device(dev))
        loss = tr.objective.loss()
        loss.backward()
        runs[dev] = float(loss.detach()), [p.grad.detach().double().cpu() for p in tr.params()]
    (loss_cpu, g_cpu), (loss_gpu, g_gpu) = runs["cpu"], runs["cuda"]
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-5)
    assert len(g_cpu) == len(g_gpu) and sum(float(g.norm()) > 0 for g in g_cpu) >= len(g_cpu) // 3
    for i, (a, b) in enumerate(zip(g_cpu, g_gpu, strict=True)):
        assert float((a - b).norm()) <= 1e-4 * float(a.norm()) + 1e-10, i


def test_resume_on_cuda_continues_the_run(tmp_path, no_tf32):
    kw = dict(adapter="trilora", steps=4)
    full = Trainer(config(tmp_path / "a", **kw), CUDA)
    full.run()
    half = Trainer(config(tmp_path / "b", **{**kw, "steps": 2}), CUDA)
    half.run()
    ckpt = half.save_checkpoint(tmp_path / "b" / "ckpt")
    resumed = Trainer(config(tmp_path / "c", **kw, resume=str(ckpt)), CUDA)
    assert resumed.step_no == 2
    resumed.run()
    # CUDA's conv backward is not bitwise deterministic: the runs agree closely, not exactly (Adam's first
    # steps magnify the last bits of near-zero gradients, hence 1 % on the factors)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-4), (full.losses, resumed.losses)
    for key, layer in full.layers.items():
        d = layer.delta().double()
        assert float((d - resumed.layers[key].delta().double()).norm()) <= 1e-2 * float(d.norm()) + 1e-7, key


@pytest.mark.parametrize("precision,targets,cache", [("fp16", ("unet",), True), ("bf16", ("unet", "text_encoder"), True),
                                                     ("fp16", ("unet", "text_encoder"), False)])
def test_a_training_step_never_makes_the_host_wait(tmp_path, precision, targets, cache):
    """Pinned inputs, losses kept on the device, fused AdamW under the grad scaler: CUDA's sync debug mode
    raises on anything in a step that would block the host (an .item(), a pageable copy, a synchronize)."""
    tr = Trainer(config(tmp_path, mixed_precision=precision, targets=targets, cache=cache, snr_gamma=5.0), CUDA)
    tr.step()  # the first step initialises lazily (cuBLAS, the grad scaler's state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [tr._step() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(loss) for loss in losses)


def test_cached_and_uncached_cuda_runs_agree(tmp_path, no_tf32):
    runs = [Trainer(config(tmp_path / str(c), cache=c, targets=("unet",)), CUDA) for c in (True, False)]
    losses = [fixed_batch_losses(tr, 3) for tr in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4), losses
    assert runs[0].on_device == ["unet"] and {"vae", "text_encoder"} <= set(runs[1].on_device)
    assert next(runs[0].base.vae.parameters()).device.type == "cpu"  # offloaded after filling the cache


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_recomputing_pointwise_steps_on_cuda_keeps_the_loss_and_lowers_the_peak(tmp_path, precision, no_tf32):
    """--recompute-pointwise on CUDA under autocast: the same loss on a fixed batch as keeping the GroupNorm/SiLU
    and GEGLU outputs, and a lower peak of what one step allocates beyond what was held before it."""
    peaks, losses = {}, {}
    for recompute in (False, True):
        tr = Trainer(config(tmp_path / str(recompute), mixed_precision=precision, targets=("unet",),
                            unet_layers="attn", batch_size=8, recompute_pointwise=recompute), CUDA)
        state = tr.gen.get_state()
        tr.step()  # lazy initialisation (cuBLAS, the scaler, the optimizer's state) out of the measurement
        tr.gen.set_state(state)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = tr.objective.loss()
        loss.backward()
        torch.cuda.synchronize()
        peaks[recompute] = torch.cuda.max_memory_allocated() - held
        losses[recompute] = float(loss.detach())
        del tr, loss
        torch.cuda.empty_cache()
    assert losses[True] == pytest.approx(losses[False], rel=2e-3), losses
    assert peaks[True] < 0.9 * peaks[False], peaks  # the dry run predicts 0.79x here


def test_a_compiled_unet_trains_on_cuda_as_the_eager_one(tmp_path):
    """--compile under fp16 autocast and the grad scaler: the same losses as eager, to half-precision tolerance."""
    losses = []
    for compiled in (False, True):
        tr = Trainer(config(tmp_path / str(compiled), mixed_precision="fp16", targets=("unet",), steps=3,
                            compile_unet=compiled), CUDA)
        tr.run()
        losses.append(tr.losses)
    assert losses[1] == pytest.approx(losses[0], rel=2e-2), losses
