"""ops/inspect.py: the report built from hand-made adapters, and ‖ΔW‖_F on factors vs dense float64."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loratool.core.modules import Adapter, Dora, LohaModule, LoraModule
from loratool.ops.inspect import (
    FileFacts,
    block_of,
    block_sort_key,
    build_report,
    delta_norm,
    lora_delta_norm,
)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense_ref(m: LoraModule) -> float:
    """The slow, obvious reference: densify in float64 and take the norm."""
    return float(m.delta(torch.float64).norm())


@pytest.mark.parametrize("out,inp,r,alpha", [(64, 48, 4, 2.0), (40, 90, 8, None), (33, 33, 33, 1.0), (12, 20, 16, 3.0)])
def test_linear_norm_matches_dense(out, inp, r, alpha):
    g = _g(out + inp + r)
    m = LoraModule("unet", "x", alpha=alpha, down=torch.randn(r, inp, generator=g),
                   up=torch.randn(out, r, generator=g))
    assert lora_delta_norm(m, torch.float64) == pytest.approx(_dense_ref(m), rel=1e-10)
    assert lora_delta_norm(m) == pytest.approx(_dense_ref(m), rel=1e-5)  # float32 Gram products


def test_conv3x3_and_fp16_norm_match_dense():
    g = _g(1)
    m = LoraModule("unet", "c", alpha=3.0, down=torch.randn(6, 5, 3, 3, generator=g).half(),
                   up=torch.randn(7, 6, 1, 1, generator=g).half())
    assert m.weight_shape == (7, 5, 3, 3)
    assert lora_delta_norm(m, torch.float64) == pytest.approx(_dense_ref(m), rel=1e-10)


def test_tucker_norm_matches_dense():
    g = _g(2)
    m = LoraModule("unet", "t", alpha=2.0, down=torch.randn(4, 5, 1, 1, generator=g),
                   mid=torch.randn(4, 4, 3, 3, generator=g), up=torch.randn(9, 4, 1, 1, generator=g))
    assert m.weight_shape == (9, 5, 3, 3)
    assert lora_delta_norm(m, torch.float64) == pytest.approx(_dense_ref(m), rel=1e-10)
    assert lora_delta_norm(m) == pytest.approx(_dense_ref(m), rel=1e-5)


def test_rank_deficient_product_norm_is_zero_not_nan():
    m = LoraModule("unet", "z", alpha=1.0, down=torch.zeros(4, 10), up=torch.randn(12, 4, generator=_g(3)))
    assert lora_delta_norm(m) == 0.0


def test_loha_norm_uses_dense_delta():
    g = _g(4)
    m = LohaModule("unet", "h", alpha=2.0, w1a=torch.randn(8, 2, generator=g), w1b=torch.randn(2, 6, generator=g),
                   w2a=torch.randn(8, 2, generator=g), w2b=torch.randn(2, 6, generator=g))
    assert delta_norm(m) == pytest.approx(float(m.delta(torch.float64).norm()), rel=1e-12)


def test_block_labels():
    def lab(component, path):
        return block_of(LoraModule(component, path, down=torch.zeros(1, 2), up=torch.zeros(2, 1)))

    assert lab("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "unet:down_blocks.1"
    assert lab("unet", "mid_block.attentions.0.proj_in") == "unet:mid_block"
    assert lab("text_encoder", "text_model.encoder.layers.5.self_attn.q_proj") == "text_encoder:layers.5"
    assert lab("transformer", "single_transformer_blocks.7.proj_out") == "transformer:single_transformer_blocks.7"


def test_blocks_sort_in_model_order():
    labels = ["text_encoder:layers.10", "unet:up_blocks.1", "text_encoder:layers.2", "unet:mid_block",
              "unet:down_blocks.2", "unet:down_blocks.0"]
    assert sorted(labels, key=block_sort_key) == ["unet:down_blocks.0", "unet:down_blocks.2", "unet:mid_block",
                                                  "unet:up_blocks.1", "text_encoder:layers.2", "text_encoder:layers.10"]


def _adapter() -> Adapter:
    g = _g(5)
    a = Adapter(base_model="sd1", source_format="kohya")
    a.add(LoraModule("unet", "down_blocks.0.attentions.0.proj_in", alpha=4.0,
                     down=torch.randn(8, 320, 1, 1, generator=g).half(), up=torch.randn(320, 8, 1, 1, generator=g).half()))
    a.add(LoraModule("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", alpha=4.0,
                     down=torch.randn(8, 768, generator=g).half(), up=torch.randn(320, 8, generator=g).half()))
    a.add(LoraModule("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", alpha=1.0,
                     down=torch.randn(4, 768, generator=g).half(), up=torch.randn(768, 4, generator=g).half(),
                     dora=Dora(torch.ones(768, 1).half(), "out")))
    a.unknown = ["lora_unet_weird.lora_down"]
    a.metadata = {"ss_network_dim": "8"}
    return a


def test_report_fields_by_hand():
    facts = FileFacts("x.safetensors", 1234, {"F16": 9}, 9, {"ss_network_dim": "8", "ss_network_alpha": "4.0"})
    rep = build_report(_adapter(), facts)
    assert rep["path"] == "x.safetensors" and rep["size_bytes"] == 1234
    assert (rep["format"], rep["base_model"], rep["kinds"]) == ("kohya", "sd1", ["lora"])
    assert rep["modules"] == 3 and rep["components"] == {"text_encoder": 1, "unet": 2}
    assert rep["ranks"] == [4, 8] and rep["rank_histogram"] == {"4": 1, "8": 2}
    assert rep["alphas"] == [1, 4] and rep["scales"] == [0.25, 0.5]
    # params: 8·(320+320) + 8·(768+320) + 4·(768+768) + 768 DoRA = 5120 + 8704 + 6144 + 768 = 20 736
    assert rep["params"] == 20_736
    # full: 320·320 + 320·768 + 768·768 = 102 400 + 245 760 + 589 824 = 937 984
    assert rep["full_params"] == 937_984
    assert rep["reduction_ratio"] == pytest.approx(937_984 / 20_736)
    assert (rep["conv_modules"], rep["dora_modules"], rep["bias_modules"]) == (1, 1, 0)
    assert rep["unknown_keys"] == ["lora_unet_weird.lora_down"]
    assert rep["dtypes"] == {"F16": 9} and rep["empty"] is False
    assert rep["metadata"]["network"]["dim"] == "8" and rep["metadata"]["keys"] == 2
    assert "module_details" not in rep
    json.dumps(rep)  # JSON-ready


def test_report_modules_and_blocks():
    a = _adapter()
    rep = build_report(a, FileFacts("x", 1), modules=True)
    rows = {r["key"]: r for r in rep["module_details"]}
    assert set(rows) == set(a.modules)
    for key, m in a.modules.items():
        assert rows[key]["delta_norm"] == pytest.approx(float(m.delta(torch.float64).norm()), rel=1e-5)
        assert rows[key]["shape"] == list(m.weight_shape)
    down0 = [r["delta_norm"] for k, r in rows.items() if "down_blocks.0" in k]
    assert rep["blocks"]["unet:down_blocks.0"] == pytest.approx(math.sqrt(sum(n * n for n in down0)))
    assert rows["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]["dora"] is True
    assert rep["dtypes"] == {"F16": 6}  # from the factor tensors when the facts have none


def test_report_of_empty_adapter():
    rep = build_report(Adapter(), FileFacts("e.safetensors", 16))
    assert rep["empty"] is True and rep["modules"] == 0 and rep["params"] == 0
    assert rep["ranks"] == [] and rep["reduction_ratio"] is None and rep["format"] is None


def test_lokr_flat_conv_norm_when_w1_columns_do_not_divide_in():
    # old LyCORIS factors in·kh·kw = 2880 as 60 × 48 for a 320×320×3×3 conv (the real SD1.5 LoKr
    # file does this); ΔW = kron(w1, w2) (2-D) reshaped to the weight
    from loratool.core.modules import LokrModule

    g = _g(6)
    w1a, w1b = torch.randn(20, 4, generator=g), torch.randn(4, 60, generator=g)
    w2a, w2b = torch.randn(16, 4, generator=g), torch.randn(4, 48, generator=g)
    m = LokrModule("unet", "conv", alpha=4.0, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, shape=(320, 320, 3, 3))
    ref = torch.kron(w1a.double() @ w1b.double(), w2a.double() @ w2b.double()).reshape(320, 320, 3, 3)
    assert torch.allclose(m.delta(torch.float64), ref)
    assert delta_norm(m) == pytest.approx(float(ref.norm()), rel=1e-12)


def test_modules_leave_torch_threads_as_they_were():
    before = torch.get_num_threads()
    build_report(_adapter(), FileFacts("x", 1), modules=True)
    assert torch.get_num_threads() == before
