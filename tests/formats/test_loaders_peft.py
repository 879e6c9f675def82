"""Our peft output loads with peft itself, and adapters made by peft and by diffusers convert to kohya
and back with ΔW preserved (non-uniform alpha/rank via alpha_pattern/rank_pattern, rsLoRA, DoRA)."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")
pytest.importorskip("diffusers")

import convert_models as cm  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from loratool.core.modules import Dora  # noqa: E402
from loratool.formats import read_adapter, write_adapter  # noqa: E402
from loratool.ops.convert import convert  # noqa: E402

TE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _delta_of_layer(layer) -> torch.Tensor:
    return layer.get_delta_weight("default").double()


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    inner = model.base_model.model
    flat_clip = not hasattr(inner, "text_model") and hasattr(inner, "encoder") and hasattr(inner, "embeddings")
    out = {}
    for name, mod in inner.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            out[("text_model." + name) if flat_clip else name] = _delta_of_layer(mod)
    return out


def _roundtrip_kohya(adapter, tmp_path, tag: str):
    k, _ = convert(adapter, "kohya")
    path = tmp_path / f"{tag}.kohya.safetensors"
    write_adapter(k, path, "kohya")
    return read_adapter(path)


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj")


@pytest.mark.parametrize("component", ["unet", "text_encoder", "text_encoder_2"])
def test_our_peft_output_loads_in_peft_with_equal_delta(tmp_path, component):
    # text_encoder: a CLIPTextModel (flat in transformers 5); text_encoder_2: SDXL's CLIPTextModelWithProjection
    kind, targets = {"unet": ("sd1", UNET_TARGETS), "text_encoder": ("te", TE), "text_encoder_2": ("te2", TE)}[component]
    adapter = cm.random_adapter({component: cm.model(kind)}, lambda c, p: p.endswith(targets), seed=21,
                                rank=lambda c, p: 2 if p.endswith(("fc1", "conv1")) else 4,
                                alpha=lambda c, p: 3.0 if "q" in p.rsplit(".", 1)[-1] else 1.5,
                                base_model="sdxl" if component == "text_encoder_2" else "sd1")
    gen = torch.Generator().manual_seed(2)
    for m in adapter.modules.values():  # DoRA everywhere (peft's use_dora is per model), output axis
        shape = (m.up.shape[0],) + (1,) * (m.down.dim() - 1)
        m.dora = Dora(torch.rand(shape, generator=gen) + 0.5, "out")
    converted, report = convert(adapter, "peft")
    assert report.exact
    folder = tmp_path / "peft"
    write_adapter(converted, folder, "peft")
    with cm.captured() as messages:
        model = PeftModel.from_pretrained(cm.model(kind), str(folder))
    assert cm.problems(messages) == []
    deltas = _peft_deltas(model)
    assert set(deltas) == {m.path for m in adapter.modules.values()}
    for m in adapter.modules.values():
        want = m.delta(torch.float64)
        assert float((deltas[m.path] - want).norm() / want.norm()) < 1e-6, m.path
    # DoRA: merged weight = m · (W + ΔW) / ‖W + ΔW‖ per output row, as our Dora.apply says
    base = cm.layers(cm.model(kind))
    model.merge_and_unload()
    merged = cm.layers(model.base_model.model)
    for m in adapter.modules.values():
        want = m.dora.apply(base[m.path].weight.detach().double(), m.delta(torch.float64))
        got = merged[m.path].weight.detach().double()
        assert float((got - want).norm() / want.norm()) < 1e-5, m.path


def test_peft_made_adapter_to_kohya_and_back(tmp_path):
    te = cm.model("te")
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TE), init_lora_weights=False, use_rslora=True,
                        rank_pattern={"fc1": 2}, alpha_pattern={"q_proj": 3})
    model = get_peft_model(te, config)
    want = _peft_deltas(model)
    model.save_pretrained(str(tmp_path / "made_by_peft"))
    ours = read_adapter(tmp_path / "made_by_peft")
    again = _roundtrip_kohya(ours, tmp_path, "peft")
    back, _ = convert(again, "peft")
    write_adapter(back, tmp_path / "back", "peft")
    final = read_adapter(tmp_path / "back")
    with cm.captured() as messages:
        loaded = PeftModel.from_pretrained(cm.model("te"), str(tmp_path / "back"))
    assert cm.problems(messages) == []
    assert set(_peft_deltas(loaded)) == set(want)
    assert set(want) == {m.path for m in again.modules.values()} == {m.path for m in final.modules.values()}
    for path, w in want.items():
        for adapter in (again, final):
            got = adapter.modules[f"text_encoder.{path}"].delta(torch.float64)
            assert float((got - w).norm() / w.norm()) < 1e-6, path


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_peft_clip_layout_is_explicit_and_read_back_either_way(tmp_path, layout):
    from loratool.formats.diffusers import encode_peft

    adapter = cm.random_adapter({"text_encoder": cm.model("te")}, lambda c, p: p.endswith(TE), seed=3)
    (tensors, _), = encode_peft(adapter, clip_layout=layout).values()
    spelt = {k.startswith("base_model.model.text_model.") for k in tensors}
    assert spelt == {layout == "nested"}
    write_adapter(adapter, tmp_path / layout, "peft", peft_clip_layout=layout)
    back = read_adapter(tmp_path / layout)
    assert set(back.modules) == set(adapter.modules)  # canonical paths carry text_model. either way
    for key, m in adapter.modules.items():
        assert torch.equal(back.modules[key].delta(torch.float64), m.delta(torch.float64))
    if layout == "nested":  # a transformers-5 CLIPTextModel has no text_model: this spelling is for v4
        return
    with cm.captured() as messages:
        PeftModel.from_pretrained(cm.model("te"), str(tmp_path / layout))
    assert cm.problems(messages) == []


def test_diffusers_made_adapter_to_kohya_and_back(tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet = cm.model("sd1")
    torch.manual_seed(6)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"],
                        rank_pattern={"down_blocks.1.resnets.0.conv1": 2}, alpha_pattern={"to_k": 1, "conv1": 6})
    unet.add_adapter(config)
    want = {name: _delta_of_layer(mod) for name, mod in unet.named_modules()
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(tmp_path / "made_by_diffusers"), unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict())
    ours = read_adapter(tmp_path / "made_by_diffusers" / "pytorch_lora_weights.safetensors")
    assert {m.path for m in ours.modules.values()} == set(want)
    again = _roundtrip_kohya(ours, tmp_path, "diffusers")
    back, _ = convert(again, "diffusers")
    write_adapter(back, tmp_path / "back.safetensors", "diffusers")
    final = read_adapter(tmp_path / "back.safetensors")
    for adapter in (again, final):
        for path, w in want.items():
            got = adapter.modules[f"unet.{path}"].delta(torch.float64)
            assert float((got - w).norm() / w.norm()) < 1e-6, path
    assert len({m.alpha / m.rank for m in again.modules.values()}) > 1  # the patterns survived
