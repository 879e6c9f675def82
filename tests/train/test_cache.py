"""The latent and text caches change where work happens, not what is trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratool.train.config import TrainConfig
from loratool.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def config(out: Path, **kw) -> TrainConfig:
    base = dict(model=str(REPO / "fixtures" / "tiny-sd"), instance_data=str(REPO / "fixtures" / "tiny-instance"),
                instance_prompt="a sks shape", output=str(out), rank=4, steps=3, lr=1e-3, batch_size=2,
                resolution=16, seed=0, snr_gamma=5.0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("targets", [("unet",), ("unet", "text_encoder")])
def test_cached_and_uncached_runs_take_the_same_steps(tmp_path, targets):
    runs = {}
    for cache in (True, False):
        tr = Trainer(config(tmp_path / str(cache), targets=targets, cache=cache), CPU)
        tr.run()
        runs[cache] = tr
    cached, plain = runs[True], runs[False]
    assert cached.latents is not None and plain.latents is None
    assert (cached.texts is not None) == (targets == ("unet",)) and plain.texts is None
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)
    for key, layer in plain.layers.items():
        d = layer.delta()
        assert float((d - cached.layers[key].delta()).norm()) <= 1e-4 * float(d.norm()) + 1e-9, key


def test_only_what_the_step_needs_stays_on_the_device(tmp_path):
    assert Trainer(config(tmp_path / "a"), CPU).on_device == ["unet"]
    assert Trainer(config(tmp_path / "b", targets=("unet", "text_encoder")), CPU).on_device == ["unet", "text_encoder"]
    assert Trainer(config(tmp_path / "c", cache=False), CPU).on_device == ["unet", "vae", "text_encoder"]
    new_tokens = Trainer(config(tmp_path / "d", instance_prompt="a <sks> shape", new_tokens=("<sks>",)), CPU)
    assert new_tokens.texts is None and "text_encoder" in new_tokens.on_device  # its embeddings train


def test_the_latent_cache_holds_each_images_distribution(tmp_path):
    tr = Trainer(config(tmp_path), CPU)
    pixels = tr.instance[:2]
    dist = tr.base.vae.encode(pixels).latent_dist
    assert torch.allclose(tr.latents.mean[:2], dist.mean, atol=1e-5)
    assert torch.allclose(tr.latents.std[:2], dist.std, atol=1e-5)
    assert tr.latents.mean.shape[0] == len(tr.instance)
