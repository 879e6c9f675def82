"""The trainer on fixtures/tiny-sd (CPU, 16x16, a few steps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from loratool.train.config import TrainConfig
from loratool.train.data import Examples
from loratool.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "fixtures" / "tiny-sd"
INSTANCE = REPO / "fixtures" / "tiny-instance"
CPU = torch.device("cpu")


def config(out: Path, **kw) -> TrainConfig:
    base = dict(model=str(MODEL), instance_data=str(INSTANCE), instance_prompt="a sks shape", output=str(out),
                rank=4, steps=2, lr=1e-3, batch_size=1, resolution=16, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_on_a_fixed_batch_is_finite_and_decreases(tmp_path):
    tr = Trainer(config(tmp_path, adapter="lora", batch_size=2, lr=3e-3), CPU)
    state = tr.gen.get_state()
    losses = []
    for _ in range(4):
        tr.gen.set_state(state)  # same images, noise and timesteps every step
        losses.append(tr.step())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.995 * losses[0], losses


def test_resume_continues_exactly(tmp_path):
    full = Trainer(config(tmp_path / "a", steps=3, targets=("unet", "text_encoder"), adapter="trilora"), CPU)
    full.run()
    half = Trainer(config(tmp_path / "b", steps=2, targets=("unet", "text_encoder"), adapter="trilora"), CPU)
    half.run()
    ckpt = half.save_checkpoint(tmp_path / "b" / "ckpt")
    resumed = Trainer(config(tmp_path / "c", steps=3, targets=("unet", "text_encoder"), adapter="trilora", resume=str(ckpt)), CPU)
    assert resumed.step_no == 2
    summary = resumed.run()
    assert summary["resumed_from"] == 2
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    for key, layer in full.layers.items():
        assert torch.allclose(layer.delta(), resumed.layers[key].delta(), atol=1e-7), key


def test_prior_preservation_batches_hold_both_sets():
    inst, klass = torch.zeros(3, 3, 8, 8), torch.ones(5, 3, 8, 8)
    ex = Examples(inst, "a sks shape", klass, "a shape")
    pixels, prompts, n = ex.batch(4, torch.Generator().manual_seed(0))
    assert n == 4 and pixels.shape[0] == 8
    assert prompts == ["a sks shape"] * 4 + ["a shape"] * 4
    assert (pixels[:4] == 0).all() and (pixels[4:] == 1).all()
    alone, prompts, n = Examples(inst, "a sks shape").batch(4, torch.Generator())
    assert n == 4 and alone.shape[0] == 4 and prompts == ["a sks shape"] * 4


def test_class_images_are_generated_and_used(tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    shutil.copy(INSTANCE / "sks_0.png", class_dir / "given.png")  # one there already: two more are made
    tr = Trainer(config(tmp_path / "out", class_data=str(class_dir), class_prompt="a shape", num_class_images=3,
                        sample_steps=2), CPU)
    assert len(list(class_dir.glob("*.png"))) == 3 and tr.klass.shape == (3, 3, 16, 16)
    pixels, prompts, n = tr.examples.batch(1, tr.gen)
    assert prompts == ["a sks shape", "a shape"] and n == 1
    assert torch.isfinite(torch.tensor(tr.step()))


def test_a_half_precision_folder_is_trained_in_fp32(tmp_path):
    """Folders published in fp16 (most SDXL ones) load as fp32 masters: mixed precision is autocast's job."""
    from diffusers import StableDiffusionPipeline

    from loratool.train.model import load_base

    half = tmp_path / "tiny-sd-fp16"
    StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None).to(torch.float16).save_pretrained(half)
    base = load_base(half, torch.device("cpu"))
    assert {p.dtype for m in base.components.values() for p in m.parameters()} == {torch.float32}


@pytest.mark.parametrize("layers", ["attn", "transformer+conv"])
def test_recomputing_pointwise_steps_trains_exactly_as_keeping_them(tmp_path, layers):
    """--recompute-pointwise: the same losses and factors step by step (LoCon too, where the convs are adapted)."""
    runs = []
    for recompute in (False, True):
        tr = Trainer(config(tmp_path / str(recompute), steps=3, unet_layers=layers, recompute_pointwise=recompute),
                     CPU)
        if recompute:
            patched = [m for m in tr.base.unet.modules() if hasattr(m, "_loratool_checkpoint")]
            kinds = {type(m).__name__ for m in patched}
            assert kinds == {"ResnetBlock2D", "GEGLU"}, kinds
        tr.run()
        runs.append(tr)
    plain, recomputed = runs
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-6, abs=1e-7)
    for key, layer in plain.layers.items():
        assert torch.allclose(layer.delta(), recomputed.layers[key].delta(), atol=1e-7), key


@pytest.mark.slow
def test_a_compiled_unet_trains_as_the_eager_one(tmp_path):
    """--compile (torch.compile with inductor, here its CPU code): the same losses and factors step by step, LoCon
    convs included; the UNet itself stays eager (sampling and saving see the plain module)."""
    runs = []
    for compiled in (False, True):
        tr = Trainer(config(tmp_path / str(compiled), steps=3, batch_size=2, unet_layers="transformer+conv",
                            compile_unet=compiled), CPU)
        tr.run()
        runs.append(tr)
    eager, compiled = runs
    assert compiled.objective.unet_forward is not compiled.base.unet and not hasattr(compiled.base.unet, "_orig_mod")
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-6)
    for key, layer in eager.layers.items():
        assert torch.allclose(layer.delta(), compiled.layers[key].delta(), atol=1e-5), key
