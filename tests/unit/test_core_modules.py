"""core/modules.py against dense float64 references built independently (loops and convolutions,
not the module's own einsums)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loratool.core.modules import Adapter, Dora, FullModule, LohaModule, LokrModule, LoraModule, NormModule

D = torch.float64


def _r(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a.to(D), b.to(D), atol=tol, rtol=tol), (a - b).abs().max()


def _matmul_loops(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b by explicit sums over the inner index (slow, obvious)."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=D)
    for k in range(a.shape[1]):
        out += a[:, k:k + 1] * b[k:k + 1, :]
    return out


# -- plain LoRA ----------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, rslora, scale", [(8.0, False, 8 / 4), (8.0, True, 8 / 2), (None, False, 1.0),
                                                  (None, True, 1.0), (1.0, False, 0.25)])
def test_linear_lora_scale_and_delta(alpha, rslora, scale) -> None:
    down, up = _r(4, 10, seed=0), _r(6, 4, seed=1)
    m = LoraModule("unet", "a.to_q", alpha=alpha, down=down, up=up, rslora=rslora)
    assert m.rank == 4 and m.weight_shape == (6, 10) and not m.is_conv
    assert m.scale == pytest.approx(scale)
    _close(m.delta(D), _matmul_loops(up, down) * scale)
    # what the adapted layer does to an input: x·Wᵀ gains scale · (x·downᵀ)·upᵀ
    x = _r(3, 10, seed=2)
    _close(x @ m.delta(D).T, scale * (x @ down.T) @ up.T)
    assert m.num_params == 4 * 10 + 6 * 4 and m.key == "unet.a.to_q"


def test_rslora_scale_formula() -> None:
    for r in (1, 3, 16, 128):
        m = LoraModule("unet", "p", alpha=16.0, down=_r(r, 5, seed=r), up=_r(5, r, seed=r + 1), rslora=True)
        assert m.scale == pytest.approx(16.0 / math.sqrt(r))


def test_rank_mismatch_refused() -> None:
    with pytest.raises(ValueError, match="disagree on the rank"):
        LoraModule("unet", "p", down=_r(4, 5, seed=0), up=_r(5, 3, seed=1))


def _conv_chain(x: torch.Tensor, *weights_and_pads) -> torch.Tensor:
    for w, pad in weights_and_pads:
        x = F.conv2d(x, w, padding=pad)
    return x


def test_conv_1x1_lora() -> None:
    down, up = _r(3, 8, 1, 1, seed=0), _r(5, 3, 1, 1, seed=1)
    m = LoraModule("unet", "conv", alpha=1.5, down=down, up=up)
    assert m.weight_shape == (5, 8, 1, 1) and m.is_conv
    x = _r(2, 8, 7, 7, seed=2)
    _close(F.conv2d(x, m.delta(D)), m.scale * _conv_chain(x, (down, 0), (up, 0)))


@pytest.mark.parametrize("k", [3, 5])
def test_conv_kxk_lora(k: int) -> None:
    down, up = _r(4, 6, k, k, seed=0), _r(7, 4, 1, 1, seed=1)
    m = LoraModule("unet", "conv", alpha=2.0, down=down, up=up)
    assert m.weight_shape == (7, 6, k, k)
    x = _r(2, 6, 9, 9, seed=3)
    _close(F.conv2d(x, m.delta(D), padding=k // 2), 0.5 * _conv_chain(x, (down, k // 2), (up, 0)))


def test_tucker_lora_mid() -> None:
    down, mid, up = _r(3, 6, 1, 1, seed=0), _r(3, 3, 3, 3, seed=1), _r(8, 3, 1, 1, seed=2)
    m = LoraModule("unet", "conv", alpha=6.0, down=down, mid=mid, up=up)
    assert m.weight_shape == (8, 6, 3, 3) and m.rank == 3 and m.scale == 2.0
    x = _r(2, 6, 8, 8, seed=4)
    _close(F.conv2d(x, m.delta(D), padding=1), 2.0 * _conv_chain(x, (down, 0), (mid, 1), (up, 0)))


def test_with_factors_drops_mid_and_rslora() -> None:
    m = LoraModule("unet", "c", alpha=4.0, down=_r(2, 3, 1, 1, seed=0), mid=_r(2, 2, 3, 3, seed=1),
                   up=_r(4, 2, 1, 1, seed=2), rslora=True)
    n = m.with_factors(_r(2, 27, seed=3), _r(4, 2, seed=4), alpha=2.0)
    assert n.mid is None and not n.rslora and n.scale == 1.0 and n.key == m.key


# -- LoHa -------------------------------------------------------------------------------------

def test_loha_linear() -> None:
    w1a, w1b, w2a, w2b = _r(6, 2, seed=0), _r(2, 5, seed=1), _r(6, 2, seed=2), _r(2, 5, seed=3)
    m = LohaModule("unet", "p", alpha=1.0, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b)
    assert m.rank == 2 and m.scale == 0.5 and m.weight_shape == (6, 5)
    ref = torch.zeros(6, 5, dtype=D)
    for o in range(6):
        for i in range(5):
            ref[o, i] = (w1a[o] @ w1b[:, i]) * (w2a[o] @ w2b[:, i]) * 0.5
    _close(m.delta(D), ref)


def test_loha_conv_flat() -> None:
    shape = (4, 3, 3, 3)
    w1a, w1b, w2a, w2b = _r(4, 2, seed=0), _r(2, 27, seed=1), _r(4, 2, seed=2), _r(2, 27, seed=3)
    m = LohaModule("unet", "c", alpha=None, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, shape=shape)
    _close(m.delta(D), (_matmul_loops(w1a, w1b) * _matmul_loops(w2a, w2b)).reshape(shape))


def _tucker_side(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per kernel position: aᵀ · t[:, :, h, w] · b  → [out, in, kh, kw] (a [r, out], b [r, in])."""
    out = torch.zeros(a.shape[1], b.shape[1], *t.shape[2:], dtype=D)
    for h in range(t.shape[2]):
        for w in range(t.shape[3]):
            out[:, :, h, w] = a.T @ t[:, :, h, w] @ b
    return out


def test_loha_tucker() -> None:
    r = 2
    t1, t2 = _r(r, r, 3, 3, seed=0), _r(r, r, 3, 3, seed=1)
    w1a, w1b, w2a, w2b = _r(r, 5, seed=2), _r(r, 4, seed=3), _r(r, 5, seed=4), _r(r, 4, seed=5)
    m = LohaModule("unet", "c", alpha=3.0, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, t1=t1, t2=t2)
    assert m.weight_shape == (5, 4, 3, 3)
    _close(m.delta(D), _tucker_side(t1, w1a, w1b) * _tucker_side(t2, w2a, w2b) * 1.5)


# -- LoKr ---------------------------------------------------------------------------------------

def _kron_loops(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Block (i, j) of the result is w1[i, j] · w2 (w2 2-D or 4-D)."""
    A, C = w1.shape
    B, Dd = w2.shape[:2]
    out = torch.zeros(A * B, C * Dd, *w2.shape[2:], dtype=D)
    for i in range(A):
        for j in range(C):
            out[i * B:(i + 1) * B, j * Dd:(j + 1) * Dd] = w1[i, j] * w2
    return out


def test_lokr_both_whole_ignores_alpha() -> None:
    w1, w2 = _r(2, 3, seed=0), _r(4, 5, seed=1)
    m = LokrModule("unet", "p", alpha=0.25, w1=w1, w2=w2)
    assert m.rank is None and m.scale == 1.0 and m.weight_shape == (8, 15)
    _close(m.delta(D), _kron_loops(w1, w2))


@pytest.mark.parametrize("side", ["w1", "w2", "both"])
def test_lokr_decomposed_sides(side: str) -> None:
    r = 2
    w1a, w1b, w2a, w2b = _r(2, r, seed=0), _r(r, 3, seed=1), _r(4, r, seed=2), _r(r, 5, seed=3)
    kw: dict = {"w1": _r(2, 3, seed=4)} if side == "w2" else {"w1a": w1a, "w1b": w1b}
    kw |= {"w2": _r(4, 5, seed=5)} if side == "w1" else {"w2a": w2a, "w2b": w2b}
    m = LokrModule("unet", "p", alpha=1.0, **kw)
    assert m.rank == r and m.scale == 0.5
    w1 = kw.get("w1", None)
    w1 = w1 if w1 is not None else _matmul_loops(w1a, w1b)
    w2 = kw.get("w2", None)
    w2 = w2 if w2 is not None else _matmul_loops(w2a, w2b)
    _close(m.delta(D), _kron_loops(w1, w2) * 0.5)
    # and what it does to an input equals the dense product
    x = _r(3, 15, seed=9)
    _close(x @ m.delta(D).T, x @ (_kron_loops(w1, w2) * 0.5).T)


def test_lokr_conv_whole_4d_w2() -> None:
    w1, w2 = _r(2, 2, seed=0), _r(3, 4, 3, 3, seed=1)
    m = LokrModule("unet", "c", alpha=5.0, w1=w1, w2=w2)
    assert m.weight_shape == (6, 8, 3, 3) and m.scale == 1.0
    _close(m.delta(D), _kron_loops(w1, w2))


def test_lokr_conv_flat_w2() -> None:
    """w2 = w2a·w2b flat [b, d·kh·kw]: the 2-D kron reshaped to the conv weight (LyCORIS)."""
    shape = (6, 8, 3, 3)
    w1, w2a, w2b = _r(2, 2, seed=0), _r(3, 2, seed=1), _r(2, 4 * 9, seed=2)
    m = LokrModule("unet", "c", alpha=1.0, w1=w1, w2a=w2a, w2b=w2b, shape=shape)
    flat = _kron_loops(w1, _matmul_loops(w2a, w2b)) * 0.5
    _close(m.delta(D), flat.reshape(shape))
    # where d divides, that is the same as the 4-D block kron of w1 with w2 as [b, d, kh, kw]
    _close(m.delta(D), _kron_loops(w1, _matmul_loops(w2a, w2b).reshape(3, 4, 3, 3)) * 0.5)


def test_lokr_conv_tucker_t2() -> None:
    r = 2
    w1, t2, w2a, w2b = _r(2, 2, seed=0), _r(r, r, 3, 3, seed=1), _r(r, 3, seed=2), _r(r, 4, seed=3)
    m = LokrModule("unet", "c", alpha=4.0, w1=w1, w2a=w2a, w2b=w2b, t2=t2)
    assert m.weight_shape == (6, 8, 3, 3) and m.scale == 2.0
    _close(m.delta(D), _kron_loops(w1, _tucker_side(t2, w2a, w2b)) * 2.0)


def test_lokr_incomplete_refused() -> None:
    with pytest.raises(ValueError, match="lokr_w1"):
        LokrModule("unet", "p", w1a=_r(2, 1, seed=0), w2=_r(2, 2, seed=1))
    with pytest.raises(ValueError, match="lokr_w2"):
        LokrModule("unet", "p", w1=_r(2, 2, seed=0), w2a=_r(2, 1, seed=1))


# -- full, norm ---------------------------------------------------------------------------------

def test_full_and_norm() -> None:
    diff = _r(4, 3, 3, 3, seed=0)
    f = FullModule("unet", "c", alpha=7.0, diff=diff)
    assert f.scale == 1.0 and f.rank is None and f.weight_shape == (4, 3, 3, 3)
    _close(f.delta(D), diff)
    n = NormModule("unet", "norm", w_norm=_r(8, seed=1), bias=_r(8, seed=2))
    assert not n.is_conv and n.weight_shape == (8,) and n.num_params == 16
    _close(n.delta(D), _r(8, seed=1))


# -- DoRA ---------------------------------------------------------------------------------------

def _dora_ref(weight: torch.Tensor, delta: torch.Tensor, mag: torch.Tensor, axis: str) -> torch.Tensor:
    merged = weight + delta
    out = torch.empty_like(merged)
    if axis == "out":
        for o in range(merged.shape[0]):
            out[o] = mag.reshape(-1)[o] * merged[o] / math.sqrt(float((merged[o] ** 2).sum()))
    else:
        for i in range(merged.shape[1]):
            col = merged[:, i]
            out[:, i] = mag.reshape(-1)[i] * col / math.sqrt(float((col ** 2).sum()))
    return out


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("conv", [False, True])
def test_dora_both_axes(axis: str, conv: bool) -> None:
    shape = (5, 4, 3, 3) if conv else (5, 4)
    weight = _r(*shape, seed=0)
    m = LoraModule("unet", "p", alpha=2.0, down=_r(2, 4 * (9 if conv else 1), seed=1), up=_r(5, 2, seed=2))
    delta = m.delta(D).reshape(shape)
    n = shape[0] if axis == "out" else shape[1]
    mshape = [1] * len(shape)
    mshape[0 if axis == "out" else 1] = n
    mag = _r(n, seed=3).abs().reshape(mshape)
    got = Dora(mag, axis).apply(weight, delta)
    _close(got, _dora_ref(weight, delta, mag, axis))
    # the norm of each row (axis out) / column (axis in) of the result is the magnitude
    norms = got.reshape(shape[0], -1).norm(dim=1) if axis == "out" else \
        got.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
    _close(norms, mag.reshape(-1))


def test_dora_magnitude_as_peft_1d() -> None:
    """PEFT stores the magnitude 1-D (out,); it means the same as (out, 1)."""
    weight, delta = _r(3, 4, seed=0), _r(3, 4, seed=1)
    mag = _r(3, seed=2).abs()
    _close(Dora(mag, "out").apply(weight, delta), _dora_ref(weight, delta, mag, "out"))


# -- adapter ------------------------------------------------------------------------------------

def test_adapter_bookkeeping() -> None:
    a = Adapter()
    a.add(LoraModule("unet", "x", down=_r(1, 2, seed=0), up=_r(2, 1, seed=1)))
    a.add(FullModule("text_encoder", "y", diff=_r(2, 2, seed=2)))
    with pytest.raises(ValueError, match="appears twice"):
        a.add(LoraModule("unet", "x", down=_r(1, 2, seed=0), up=_r(2, 1, seed=1)))
    assert a.components() == {"unet": 1, "text_encoder": 1} and a.kinds == ["full", "lora"]


def test_delta_dtype_and_precision() -> None:
    m = LoraModule("unet", "p", alpha=1.0, down=_r(2, 3, seed=0).half(), up=_r(3, 2, seed=1).half())
    assert m.delta().dtype == torch.float32 and m.delta(D).dtype == D
    ref = _matmul_loops(m.up.to(D), m.down.to(D)) * 0.5  # fp16 factors, multiplied in fp64
    _close(m.delta(D), ref)
