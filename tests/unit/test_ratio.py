"""ops/ratio.py against numbers worked out by hand (written out in each test)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loratool.core.modules import Adapter, Dora, LoraModule
from loratool.ops import ratio as R


def test_square_linear_by_hand():
    # 1280x1280: d·k = 1 638 400; r=8: 8·(1280+1280) = 20 480; 1 638 400 / 20 480 = 80
    rows = R.shapes_table([(1280, 1280)], [8, 16, 32])
    assert [(r.full, r.lora) for r in rows] == [(1_638_400, 20_480), (1_638_400, 40_960), (1_638_400, 81_920)]
    assert [r.ratio for r in rows] == [80.0, 40.0, 20.0]


def test_rectangular_linear_by_hand():
    # SD1.5 cross-attention to_k: out 320, in 768. d·k = 245 760; r=4: 4·1088 = 4 352
    assert R.full_params((320, 768)) == 245_760
    assert R.lora_params((320, 768), 4) == 4_352
    assert R.shapes_table([(320, 768)], [4])[0].ratio == pytest.approx(245_760 / 4_352)
    assert R.shapes_table([(320, 768)], [4])[0].ratio == pytest.approx(56.470588235)


def test_conv_counts_kernel_in_k():
    # 3x3 conv 320->320: d = 320, k = 320·3·3 = 2880; full 921 600; r=4: 4·(2880+320) = 12 800; 72
    row = R.shapes_table([(320, 320, 3, 3)], [4])[0]
    assert (row.full, row.lora, row.ratio) == (921_600, 12_800, 72.0)
    # 1x1 conv behaves as the linear layer of the same sizes
    assert R.lora_params((640, 320, 1, 1), 8) == R.lora_params((640, 320), 8) == 8 * 960


def test_square_at_tenth_rank_is_five_not_ten():
    # d = k = 1000, r = 100: 10^6 / (100·2000) = 5 (the seed text says "roughly 10x")
    assert R.shapes_table([(1000, 1000)], [100])[0].ratio == 5.0
    for d in (320, 640, 1280, 3072):
        assert R.shapes_table([(d, d)], [d // 10])[0].ratio == pytest.approx(5.0, rel=0.02)


def test_several_layers_sum_before_dividing():
    # (1280x1280) + (320x768) at r=4: full 1 638 400 + 245 760 = 1 884 160;
    # lora 4·2560 + 4·1088 = 10 240 + 4 352 = 14 592; ratio 129.1228...
    row = R.shapes_table([(1280, 1280), (320, 768)], [4])[0]
    assert (row.full, row.lora, row.layers) == (1_884_160, 14_592, 2)
    assert row.ratio == pytest.approx(1_884_160 / 14_592)


def test_parse_shape():
    assert R.parse_shape("1280x1280") == (1280, 1280)
    assert R.parse_shape("320X320x3x3") == (320, 320, 3, 3)
    for bad in ("1280", "axb", "0x5", "1x2x3"):
        with pytest.raises(ValueError):
            R.parse_shape(bad)


def test_training_memory_by_hand():
    # 1000 model weights (all trained in a full fine-tune), a LoRA of 10 parameters
    est = R.memory_estimate(1000, 0, 10)
    # fp32 full: 1000·(4 weight + 4 grad + 8 Adam) = 16 000
    assert est["fp32"]["full"] == {"weights": 4000, "gradients": 4000, "adam": 8000, "total": 16000}
    # fp32 LoRA: (1000 + 10)·4 weights, 10·4 grads, 10·8 Adam = 4040 + 40 + 80 = 4160
    assert est["fp32"]["lora"] == {"weights": 4040, "gradients": 40, "adam": 80, "total": 4160}
    # fp16 mixed full: 1000·(2 + 2 + 8) = 12 000; LoRA: 1010·2 + 10·2 + 10·8 = 2120
    assert est["fp16-mixed"]["full"]["total"] == 12000
    assert est["fp16-mixed"]["lora"]["total"] == 2120
    # with 100 frozen weights (a VAE): full fp32 = 1100·4 + 1000·4 + 1000·8 = 16 400; LoRA 1110·4 + 120
    est = R.memory_estimate(1000, 100, 10)
    assert est["fp32"]["full"]["total"] == 16_400 and est["fp32"]["lora"]["total"] == 4_560


def test_file_bytes_counts_one_alpha_per_module():
    # 2 modules, 14 592 factor values + 2 alphas, fp16: 14 594·2 = 29 188 bytes
    assert R.file_bytes(14_592, 2, 2) == 29_188
    rows = R.model_rows([(1280, 1280), (320, 768)], [4], trainable=1_884_160)
    assert rows[0]["fp16_mib"] == 29_188 / 2**20
    assert rows[0]["fp32_mib"] == 58_376 / 2**20


# SD1.5 kohya default targets (UNet transformer blocks + CLIP-L attention/MLP), per unit of rank:
# a transformer block of width C (cross-attention context 768) has
#   proj_in C+C, attn1 q/k/v/out 4·2C, attn2 q 2C, k/v 2·(768+C), out 2C, ff.net.0.proj C+8C,
#   ff.net.2 4C+C, proj_out 2C  ->  32C + 1536;
# blocks: 5 at C=320, 5 at 640, 6 at 1280 (incl. mid):
#   5·11 776 + 5·22 016 + 6·42 496 = 58 880 + 110 080 + 254 976 = 423 936
# CLIP-L, 12 layers: q/k/v/out 4·1536 + fc1 768+3072 + fc2 3072+768 = 13 824 -> 165 888
SD15_SUM_D_PLUS_K = 423_936 + 165_888  # = 589 824


def test_sd15_by_hand_matches_the_real_kohya_r128_file(real_dir):
    shapes = json.loads((real_dir / "keyshapes" / "sd15_kohya_lora_r128.json").read_text())
    downs = {k: v["shape"] for k, v in shapes.items() if k.endswith("lora_down.weight")}
    ups = {k: v["shape"] for k, v in shapes.items() if k.endswith("lora_up.weight")}
    assert len(downs) == len(ups) == 264  # 192 UNet + 72 text encoder
    stored = sum(math.prod(s) for s in downs.values()) + sum(math.prod(s) for s in ups.values())
    assert stored == 128 * SD15_SUM_D_PLUS_K
    # data bytes of that file (fp16 factors + 264 fp16 alphas) vs our size estimate
    data = sum(math.prod(v["shape"]) * 2 for v in shapes.values())
    assert R.file_bytes(128 * SD15_SUM_D_PLUS_K, 264, 2) == data
    # 144.0 MiB at rank 128. The blog post in seeds/002 gives 163 MiB for "rank 128" (and
    # 11/21/41/82 MiB for 8/16/32/64): about 13% more than this real file holds.
    assert data / 2**20 == pytest.approx(144.0, abs=0.01)


def _lora(component, path, out, inp, r, alpha=None, dora=False):
    g = torch.Generator().manual_seed(out * 7 + inp + r)
    m = LoraModule(component=component, path=path, alpha=alpha,
                   down=torch.randn(r, inp, generator=g), up=torch.randn(out, r, generator=g))
    if dora:
        m.dora = Dora(torch.ones(out, 1), "out")
    return m


def test_adapter_ratio_per_component_by_hand():
    a = Adapter()
    a.add(_lora("unet", "a.to_q", 1280, 1280, 8, alpha=4))  # full 1 638 400, LoRA 20 480
    a.add(_lora("unet", "a.to_k", 320, 768, 4))  # full 245 760, LoRA 4 352
    a.add(_lora("text_encoder", "text_model.x.q_proj", 768, 768, 4, dora=True))  # 589 824; 6 144 + 768
    out = R.adapter_ratio(a)
    assert out["components"]["unet"] == {"modules": 2, "full_params": 1_884_160, "adapter_params": 24_832,
                                         "ratio": 1_884_160 / 24_832}
    te = out["components"]["text_encoder"]
    assert (te["full_params"], te["adapter_params"]) == (589_824, 6_912)
    assert out["total"]["full_params"] == 1_884_160 + 589_824
    assert out["total"]["adapter_params"] == 24_832 + 6_912


def test_empty_adapter_has_no_ratio():
    out = R.adapter_ratio(Adapter())
    assert out["total"] == {"modules": 0, "full_params": 0, "adapter_params": 0, "ratio": None}
