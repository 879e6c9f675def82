"""LoRA / TriLoRA layers: initialisation, forward, and the exactness of the folded export (fp64 references)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loratool.train.layers import AdaptedLayer, adapt, target_names


def _randomise(layer: AdaptedLayer, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in layer.factors().values():
            p.copy_(torch.randn(p.shape, generator=gen))


def _bases():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(12, 10)
    conv = nn.Conv2d(6, 5, 3, padding=1, stride=2)
    for m in (lin, conv):
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return [lin, conv]


@pytest.mark.parametrize("base", _bases(), ids=["linear", "conv"])
@pytest.mark.parametrize("fold", ["balanced", "bc"])
def test_trilora_fold_is_exactly_the_three_factor_delta(base, fold):
    layer = AdaptedLayer(base, "trilora", rank=4, alpha=3.0, init="svd")
    _randomise(layer, torch.Generator().manual_seed(1))
    b, c, a = (t.detach().double() for t in (layer.B, layer.C, layer.A))
    expected = (3.0 / 4) * (b @ c @ a)  # the obvious reference: (α/r)·B·C·A
    module = layer.to_module("unet", "x", fold)
    got = module.delta(torch.float64).reshape(expected.shape[0], -1)
    assert module.rank == 4 and module.alpha == 3.0
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    if fold == "balanced":  # the split balances the two factors' norms
        up, down = layer.folded("balanced")
        assert 0.2 < (up.norm() / down.norm()).item() < 5.0


@pytest.mark.parametrize("base", _bases(), ids=["linear", "conv"])
@pytest.mark.parametrize("kind", ["lora", "trilora"])
def test_forward_is_base_plus_delta(base, kind):
    layer = AdaptedLayer(base, kind, rank=3, init="orthogonal", generator=torch.Generator().manual_seed(2))
    _randomise(layer, torch.Generator().manual_seed(3))
    w = base.weight.detach().double() + layer.delta(torch.float64)
    if isinstance(base, nn.Linear):
        x = torch.randn(4, 12, dtype=torch.float64)
        ref = F.linear(x, w, base.bias.double())
    else:
        x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
        ref = F.conv2d(x, w, base.bias.double(), base.stride, base.padding)
    got = layer.double()(x)
    assert torch.allclose(got, ref, atol=1e-9)


def test_svd_init_follows_the_paper():
    base = _bases()[0]
    layer = AdaptedLayer(base, "trilora", rank=4, init="svd")
    u, s, _ = torch.linalg.svd(base.weight.detach().double())
    assert torch.allclose(layer.C.detach().double(), torch.diag(s[:4]), atol=1e-5)
    # B spans the top-4 left singular vectors (signs may differ)
    assert torch.allclose((u[:, :4].T @ layer.B.detach().double()).abs(), torch.eye(4, dtype=torch.float64), atol=1e-5)
    assert torch.count_nonzero(layer.A) == 0 and torch.count_nonzero(layer.delta()) == 0


def test_orthogonal_init_and_lora_init():
    base = _bases()[1]
    tri = AdaptedLayer(base, "trilora", rank=4, init="orthogonal", generator=torch.Generator().manual_seed(0))
    eye = torch.eye(4)
    assert torch.allclose(tri.B.T @ tri.B, eye, atol=1e-5)
    assert torch.allclose(tri.A @ tri.A.T, eye, atol=1e-5)
    assert torch.count_nonzero(tri.C) == 0
    lora = AdaptedLayer(base, "lora", rank=4, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(lora.up) == 0 and torch.count_nonzero(lora.down) > 0
    assert tri.delta().abs().max() == 0 and lora.delta().abs().max() == 0


def test_rank_is_capped_by_the_layer_and_targets_are_found():
    model = nn.Sequential()
    model.add_module("attn", nn.Module())
    model.attn.to_q = nn.Linear(3, 3)
    model.attn.other = nn.Linear(3, 3)
    names = target_names(model, "unet")
    assert names == ["attn.to_q"]
    layers = adapt(model, names, "lora", 8, None, "svd", torch.Generator())
    assert layers["attn.to_q"].rank == 3 and isinstance(model.attn.to_q, AdaptedLayer)
    assert target_names(model, "unet") == []  # already adapted layers are not wrapped twice


def test_layer_sets_follow_kohya_and_diffusers():
    """The one --targets vocabulary on the UNet: attn (diffusers) < transformer (kohya LoRA) < transformer+conv
    (kohya LoCon, the old --unet-layers all) < all (every layer)."""
    from diffusers import UNet2DConditionModel

    from loratool.arch.table import TARGET_SETS
    from loratool.train.layers import LAYER_SETS

    assert LAYER_SETS == tuple(TARGET_SETS)  # one vocabulary with extract and ratio
    unet = UNet2DConditionModel.from_pretrained(str(Path(__file__).resolve().parents[2] / "fixtures/tiny-sd/unet"))
    attn, transformer, locon, every = (set(target_names(unet, "unet", s)) for s in LAYER_SETS)
    blocks = {n for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"}
    assert attn < transformer < locon < every
    # kohya's networks.lora: 12 layers a transformer block (proj_in/out, 2 x q/k/v/out, 2 feed-forward)
    assert len(transformer) == 12 * len(blocks) and len(attn) == 8 * len(blocks)
    extra = locon - transformer
    assert {n.rsplit(".", 1)[1] for n in extra} == {"conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv"}
    assert not any(n.startswith(("conv_in", "conv_out", "time_embedding")) for n in locon)
    assert {n.split(".")[0] for n in every - locon} == {"conv_in", "conv_out", "time_embedding"}
    adapt(unet, sorted(locon), "lora", 2, None, "svd", torch.Generator())
    assert target_names(unet, "unet", "transformer+conv") == []  # already adapted layers are not wrapped twice
    assert set(target_names(unet, "unet", "all")) == every - locon
    with pytest.raises(ValueError):
        target_names(unet, "unet", "convs")


def test_text_encoder_layers_follow_the_same_vocabulary():
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(str(Path(__file__).resolve().parents[2] / "fixtures/tiny-sd/text_encoder"))
    n = te.config.num_hidden_layers
    attn, transformer, locon, every = (set(target_names(te, "text_encoder", s)) for s in
                                       ("attn", "transformer", "transformer+conv", "all"))
    assert len(attn) == 4 * n and len(transformer) == 6 * n == len(locon)  # + mlp.fc1, mlp.fc2 (kohya)
    assert {x.rsplit(".", 1)[1] for x in transformer - attn} == {"fc1", "fc2"}
    assert every >= transformer


@pytest.mark.parametrize("kind", ["lora", "trilora"])
def test_a_linear_layer_adds_its_update_in_one_product(kind):
    """A linear layer's update is one addmm (the scale and the add in its epilogue): the same output and
    gradients as base + scale·(x·downᵀ)·upᵀ, and no separate add or multiply in the forward pass."""
    gen = torch.Generator().manual_seed(3)
    layer = AdaptedLayer(nn.Linear(24, 40), kind, rank=4, alpha=2.0, generator=gen)
    _randomise(layer, gen)
    x = torch.randn(2, 5, 24, generator=gen, requires_grad=True)
    update = layer.delta(torch.float32)
    expected = layer.base(x) + F.linear(x, update)
    seen = []

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)  # fp32, the factors in another order
    assert "addmm" in seen and not {"add", "mul"} & set(seen), seen
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, [x, *layer.factors().values()], g)
    ref = torch.autograd.grad(layer.base(x) + layer.scale * F.linear(F.linear(x, _chain(layer)), _last(layer)),
                              [x, *layer.factors().values()], g, allow_unused=True)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _chain(layer: AdaptedLayer) -> torch.Tensor:
    return layer.down if layer.kind == "lora" else layer.C @ layer.A


def _last(layer: AdaptedLayer) -> torch.Tensor:
    return layer.up if layer.kind == "lora" else layer.B
