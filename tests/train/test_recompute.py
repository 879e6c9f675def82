"""train/recompute.py's pointwise recomputation on single diffusers blocks: the same outputs and gradients as
the unpatched block (the norms' own parameters included), under CPU autocast too, and less kept for the
backward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from loratool.train.recompute import recompute_pointwise


def _blocks():
    from diffusers.models.activations import GEGLU
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    resnet = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=16, groups=8)
    geglu = GEGLU(32, 48)
    return resnet, geglu


def _run(block, x, temb, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = block(x, temb) if temb is not None else block(x)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True])
def test_patched_blocks_give_the_same_outputs_and_gradients(autocast):
    for block, args in zip(_blocks(), [(torch.randn(2, 32, 8, 8), torch.randn(2, 16)), (torch.randn(2, 10, 32), None)],
                           strict=True):
        patched = copy.deepcopy(block)
        assert recompute_pointwise(patched) == 1
        runs = []
        for b in (block, patched):
            x = args[0].clone().requires_grad_(True)
            out, grads = _run(b, x, args[1], autocast)
            runs.append((out, grads, x.grad))
        (out0, g0, x0), (out1, g1, x1) = runs
        assert out1.dtype == out0.dtype and torch.equal(out1, out0)
        assert g1.keys() == g0.keys() and len(g0) == len(list(block.parameters()))  # the norms' too
        tol = dict(rtol=1e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], **tol, msg=k)
        torch.testing.assert_close(x1, x0, **tol)


def test_frozen_blocks_keep_less_for_the_backward_pass():
    resnet, _ = _blocks()
    resnet.requires_grad_(False)
    patched = copy.deepcopy(resnet)
    recompute_pointwise(patched)
    kept = []
    for b in (resnet, patched):
        saved: dict[int, int] = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(4, 32, 16, 16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            b(x, torch.randn(4, 16))
        kept.append(sum(saved.values()))
    assert kept[1] < 0.8 * kept[0], kept


def test_no_graph_no_recomputation():
    _, geglu = _blocks()
    recompute_pointwise(geglu)
    with torch.no_grad():
        out = geglu(torch.randn(2, 3, 32))
    assert out.grad_fn is None and out.shape == (2, 3, 48)
