"""ops/ratio.py's three modes of the ``ratio`` command, without click: a shape, a model table, a file."""

from __future__ import annotations

import pytest
import torch

from loratool.arch import load_arch
from loratool.core.modules import Adapter, LoraModule
from loratool.ops import ratio as R


def test_shape_report_by_hand():
    # 320x320x3x3: d = 320, k = 2880; r = 8: 8·3200 = 25 600; 921 600 / 25 600 = 36
    rows = R.shape_report([(320, 320, 3, 3), (1280, 1280)], iter([8, 16]))["rows"]
    assert [(r["d"], r["k"], r["rank"], r["lora_params"]) for r in rows] == [
        (320, 2880, 8, 25_600), (320, 2880, 16, 51_200), (1280, 1280, 8, 20_480), (1280, 1280, 16, 40_960)]
    assert rows[0]["ratio"] == 36.0


def test_components_default_all_and_chosen():
    flux = load_arch("flux")
    assert R.pick_components(flux, "default") == ("transformer", "text_encoder")  # T5 left out, as kohya does
    assert set(R.pick_components(flux, "all")) == set(flux.components)
    assert R.pick_components(flux, " transformer ,") == ("transformer",)
    for bad in ("unet", "", ","):
        with pytest.raises(ValueError, match="flux has"):
            R.pick_components(flux, bad)


def test_model_report_counts_the_targeted_layers_once_per_rank():
    sd1 = load_arch("sd15")
    comps = R.pick_components(sd1, "default")
    report = R.model_report(sd1, "transformer", comps, [8, 16])
    specs = sd1.targets("transformer", components=comps)
    assert report["layers"] == len(specs) == sum(report["layers_by_component"].values())
    assert report["full_params"] == sum(R.full_params(s.shape) for s in specs)
    trainable, frozen = R.model_totals(sd1, comps)
    assert report["model_params"] == {"trainable": trainable, "frozen": frozen} and frozen > 0  # the VAE
    assert [r["rank"] for r in report["rows"]] == [8, 16]
    assert report["rows"][1]["lora_params"] == 2 * report["rows"][0]["lora_params"]


def test_file_report_with_and_without_ranks():
    a = Adapter(base_model="sd1", source_format="kohya")
    a.add(LoraModule("unet", "a.to_q", alpha=4.0, down=torch.zeros(4, 320), up=torch.zeros(320, 4)))
    plain = R.file_report(a, "x.safetensors", [])
    assert plain["mode"] == "file" and "rows" not in plain and plain["total"]["adapter_params"] == 4 * 640
    rows = R.file_report(a, "x.safetensors", [2])["rows"]
    assert rows == [{"rank": 2, "layers": 1, "full_params": 102_400, "lora_params": 1_280, "ratio": 80.0}]
