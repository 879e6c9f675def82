"""Against peft itself: a peft model with rank_pattern/alpha_pattern/rsLoRA (and DoRA) saved the way peft
saves it is read with the ΔW peft computes, and our peft output loads back into peft with the same ΔW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from loratool.formats import decode  # noqa: E402
from loratool.formats.diffusers import encode_peft  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 7)
        self.c = nn.Linear(7, 4)
        self.d = nn.Conv2d(3, 4, 3)


def _peft_model(use_rslora: bool, use_dora: bool = False):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, rank_pattern={"b": 2}, alpha_pattern={"c": 3, "d": 5},
                          use_rslora=use_rslora, use_dora=use_dora, target_modules=["a", "b", "c", "d"],
                          init_lora_weights=False)
    return peft.get_peft_model(Tiny(), cfg), cfg


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name.split(".")[-1]] = module.get_delta_weight("default").double()
    return out


@pytest.mark.parametrize("use_rslora", [False, True])
def test_read_what_peft_saves(use_rslora):
    model, cfg = _peft_model(use_rslora)
    state = peft.get_peft_model_state_dict(model)
    a = decode(state, config=cfg.to_dict(), component="model")
    assert a.source_format == "peft" and sorted(a.modules) == ["model.a", "model.b", "model.c", "model.d"]
    assert a.modules["model.b"].rank == 2 and a.modules["model.c"].alpha == 3.0
    for name, reference in _peft_deltas(model).items():
        ours = a.modules[f"model.{name}"].delta(torch.float64)
        assert float((ours - reference).abs().max()) <= 1e-6 * float(reference.abs().max()), name


def test_dora_magnitude_from_peft_is_the_output_axis():
    model, cfg = _peft_model(False, use_dora=True)
    state = peft.get_peft_model_state_dict(model)
    a = decode(state, config=cfg.to_dict(), component="model")
    for name in ("a", "b", "c"):
        m = a.modules[f"model.{name}"]
        assert m.dora is not None and m.dora.axis == "out"
        assert torch.equal(m.dora.magnitude.reshape(-1), state[f"base_model.model.{name}.lora_magnitude_vector"])


def test_our_peft_output_loads_into_peft():
    model, cfg = _peft_model(True)
    a = decode(peft.get_peft_model_state_dict(model), config=cfg.to_dict(), component="model")
    (tensors, config), = encode_peft(a).values()
    config = {k: v for k, v in config.items() if k != "peft_type"}
    fresh = peft.get_peft_model(Tiny(), peft.LoraConfig(**config))
    result = peft.set_peft_model_state_dict(fresh, tensors)
    assert not result.unexpected_keys
    reference = _peft_deltas(model)
    for name, delta in _peft_deltas(fresh).items():
        assert float((delta - reference[name]).abs().max()) <= 1e-6 * float(reference[name].abs().max()), name
