"""Flux: exact fuse/split of LoRA factors, kohya/BFL (fused) <-> diffusers/ai-toolkit (split) names,
scale folding for layouts without alpha, the final modulation's row order, XLabs single blocks."""

from __future__ import annotations

import pytest
import torch
from test_codecs_helpers import adapter_of, assert_same_delta, assert_same_factors, lora, rand

from loratool.core.modules import LoraModule
from loratool.errors import LoraToolError
from loratool.formats import decode, encode, fold_scale, fuse_lora, split_lora

D = "transformer.transformer_blocks.0"
S = "transformer.single_transformer_blocks.0"


def _dense(m: LoraModule) -> torch.Tensor:
    return m.delta(torch.float64)


def _parts(g, widths, r, alphas, shared=False):
    down = rand(g, r, 12)
    mods = []
    for i, (w, a) in enumerate(zip(widths, alphas, strict=True)):
        mods.append(LoraModule("transformer", f"p{i}", alpha=a, down=down if shared else rand(g, r, 12),
                               up=rand(g, w, r)))
    return mods


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("alphas", [(2.0, 2.0, 2.0), (1.0, 4.0, None)])
def test_fuse_then_split_is_exact(shared, alphas):
    g = torch.Generator().manual_seed(0)
    if shared and len(set(alphas)) > 1:
        alphas = (3.0, 3.0, 3.0)
    parts = _parts(g, (6, 6, 9), 4, alphas, shared)
    fused = fuse_lora(parts, "transformer", "fused")
    reference = torch.cat([_dense(p) for p in parts], dim=0)
    assert float((_dense(fused) - reference).abs().max()) <= 1e-12 * float(reference.abs().max())
    rows = [(0, 6), (6, 12), (12, 21)]
    back = split_lora(fused, [(f"transformer.q{i}", rr) for i, rr in enumerate(rows)])
    for p, b in zip(parts, back, strict=True):
        assert float((_dense(b) - _dense(p)).abs().max()) <= 1e-12 * float(_dense(p).abs().max())
    if not shared:  # block-diagonal up: the split cuts the down too, rank per part as before
        assert [b.rank for b in back] == [4, 4, 4]
        assert all(torch.equal(b.down, p.down) for b, p in zip(back, parts, strict=True))
    else:  # one shared down: the parts keep it (same storage, no copy) and slice the ups
        assert all(b.down.data_ptr() == fused.down.data_ptr() for b in back)


def test_split_of_a_dense_up_shares_the_down():
    g = torch.Generator().manual_seed(1)
    m = LoraModule("transformer", "x", alpha=3.0, down=rand(g, 5, 8), up=rand(g, 12, 5))
    parts = split_lora(m, [("transformer.a", (0, 4)), ("transformer.b", (4, 12))])
    assert torch.equal(torch.cat([_dense(p) for p in parts]), _dense(m))
    assert all(p.rank == 5 and p.alpha == 3.0 for p in parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fold_scale(dtype):
    g = torch.Generator().manual_seed(2)
    m = lora(g, f"{D}.attn.to_out.0", (8, 6), 4, alpha=1.0, dtype=dtype)  # scale 1/4: √ on each factor
    folded = fold_scale(m)
    assert folded.alpha is None and folded.up.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert float((_dense(folded) - _dense(m)).abs().max()) <= tol * float(_dense(m).abs().max())
    neg = lora(g, f"{D}.attn.to_out.0", (8, 6), 4, alpha=-2.0)
    assert torch.allclose(_dense(fold_scale(neg)), _dense(neg), rtol=1e-6, atol=1e-7)
    unit = lora(g, f"{D}.attn.to_out.0", (8, 6), 4, alpha=4.0)  # scale 1: nothing to fold, same tensors
    assert fold_scale(unit).up is unit.up


def flux_fused(seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return adapter_of([
        lora(g, f"{D}.attn.to_qkv", (18, 6), 4, alpha=4.0, dtype=dtype),
        lora(g, f"{D}.attn.to_added_qkv", (18, 6), 2, alpha=1.0, dtype=dtype),
        lora(g, f"{S}.to_qkv_mlp", (30, 6), 4, alpha=4.0, dtype=dtype),
        lora(g, f"{S}.proj_out", (6, 30), 4, alpha=4.0, dtype=dtype),
        lora(g, "transformer.norm_out.linear", (12, 6), 2, alpha=2.0, dtype=dtype),
        lora(g, "text_encoder.text_model.encoder.layers.0.mlp.fc1", (16, 8), 2, alpha=1.0, dtype=dtype),
        lora(g, "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0", (16, 8), 2, alpha=2.0, dtype=dtype),
    ], "flux")


def test_flux_kohya_names_and_roundtrip():
    a = flux_fused()
    tensors, meta = encode(a, "kohya")
    ids = {k.split(".")[0] for k in tensors}
    assert ids == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
                   "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
                   "lora_unet_final_layer_adaLN_modulation_1", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                   "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"}
    assert meta["ss_network_module"] == "networks.lora_flux"
    # BFL's final modulation rows are [shift, scale]: the up is stored with its halves swapped
    up = tensors["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(up, torch.cat([a.modules["transformer.norm_out.linear"].up[6:],
                                      a.modules["transformer.norm_out.linear"].up[:6]]))
    b = decode(tensors, meta)
    assert b.base_model == "flux" and b.source_format == "kohya"
    assert_same_factors(a, b)


def test_flux_bfl_folds_alpha_and_keeps_delta():
    a = flux_fused()
    a.modules = {k: m for k, m in a.modules.items() if m.component == "transformer"}
    tensors, meta = encode(a, "bfl")
    assert all(k.startswith("diffusion_model.") and ".alpha" not in k for k in tensors)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in tensors
    b = decode(tensors, meta)
    assert b.source_format == "bfl"
    assert_same_delta(a, b, exact=False, rtol=1e-6)
    assert all(m.alpha is None for m in b.modules.values())
    # modules at scale 1 are written bit-identically
    for key in (f"{D}.attn.to_qkv", f"{S}.proj_out", "transformer.norm_out.linear"):
        if a.modules[key].scale == 1.0:
            assert torch.equal(b.modules[key].down, a.modules[key].down)


def test_split_modules_need_fusing_for_kohya_and_bfl():
    g = torch.Generator().manual_seed(4)
    a = adapter_of([lora(g, f"{D}.attn.to_q", (6, 6), 2, alpha=1.0)], "flux")
    for fmt in ("kohya", "bfl"):
        with pytest.raises(LoraToolError, match="fuse it first"):
            encode(a, fmt)
    with pytest.raises(LoraToolError, match="split it first"):
        encode(flux_fused(), "aitoolkit")


def test_aitoolkit_and_diffusers_split_names():
    g = torch.Generator().manual_seed(5)
    mods = [lora(g, f"{D}.attn.{p}", (3072, 3072), 2, alpha=a) for p, a in
            (("to_q", 2.0), ("to_k", 1.0), ("add_v_proj", 2.0), ("to_out.0", 4.0))]
    mods.append(lora(g, f"{S}.proj_mlp", (12, 3072), 2, alpha=2.0, dtype=torch.bfloat16))
    a = adapter_of(mods, "flux")
    ta, ma = encode(a, "aitoolkit")
    assert all(k.startswith("transformer.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in ta)
    b = decode(ta, ma)
    assert b.base_model == "flux"
    for key, m in a.modules.items():
        n = b.modules[key]
        assert n.alpha is None and n.up.dtype == m.up.dtype
        if m.scale == 1.0:
            assert torch.equal(n.up, m.up) and torch.equal(n.down, m.down)
        else:  # √scale folded on each factor (fp32 / bf16 rounding of a product of factors)
            folded = fold_scale(m)
            assert torch.equal(n.up, folded.up) and torch.equal(n.down, folded.down)
    td, md = encode(a, "diffusers")
    assert_same_factors(a, decode(td, md))


def test_kohya_split_qkv_fused_then_back_to_diffusers_is_exact():
    """kohya Flux -> canonical fused -> split (arch part rows) -> diffusers -> back: same ΔW."""
    g = torch.Generator().manual_seed(6)
    fused = lora(g, f"{D}.attn.to_qkv", (18, 6), 3, alpha=3.0)
    parts = split_lora(fused, [(f"{D}.attn.to_{x}", (6 * i, 6 * i + 6)) for i, x in enumerate("qkv")])
    a = adapter_of(parts, "flux")
    td, md = encode(a, "diffusers")
    b = decode(td, md)
    refused = fuse_lora([b.modules[f"{D}.attn.to_{x}"] for x in "qkv"], "transformer", f"{D[12:]}.attn.to_qkv")
    assert float((_dense(refused) - _dense(fused)).abs().max()) <= 1e-12 * float(_dense(fused).abs().max())


def test_xlabs_layout_reads_exactly():
    g = torch.Generator().manual_seed(7)
    t = {  # names are what matters; small widths keep the dense check cheap
        "double_blocks.0.processor.qkv_lora1.down.weight": rand(g, 4, 16),
        "double_blocks.0.processor.qkv_lora1.up.weight": rand(g, 48, 4),
        "double_blocks.0.processor.proj_lora2.down.weight": rand(g, 4, 16),
        "double_blocks.0.processor.proj_lora2.up.weight": rand(g, 16, 4),
        "single_blocks.1.processor.qkv_lora.down.weight": rand(g, 4, 16),
        "single_blocks.1.processor.qkv_lora.up.weight": rand(g, 48, 4),
    }
    a = decode(t)
    assert a.source_format == "xlabs" and a.base_model == "flux" and not a.unknown
    assert sorted(a.modules) == sorted([f"{D}.attn.to_qkv", f"{D}.attn.to_add_out",
                                        *(f"{S[:-1]}1.attn.to_{x}" for x in "qkv")])
    single = torch.cat([a.modules[f"{S[:-1]}1.attn.to_{x}"].delta(torch.float64) for x in "qkv"])
    ref = t["single_blocks.1.processor.qkv_lora.up.weight"].double() @ t["single_blocks.1.processor.qkv_lora.down.weight"].double()
    assert torch.equal(single, ref)
