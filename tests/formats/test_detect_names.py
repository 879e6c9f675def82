"""The codecs' fallback spelling rules (formats/names.py) agree with the architecture tables on every module
the tables list, so a table and a rule can never name one module two ways."""

from __future__ import annotations

import pytest

from loratool.arch import load_arch
from loratool.formats import names


@pytest.mark.parametrize("base", ["sd1", "sd2", "sdxl"])
def test_sai_rules_match_the_tables(base):
    table = load_arch(base)
    prefix = table.checkpoint_prefix["unet"]
    checked = 0
    for spec in table.modules.values():
        if spec.component != "unet" or not spec.checkpoint_key:
            continue
        sai = spec.checkpoint_key[len(prefix):].removesuffix(".weight")
        assert names.sai_unet_to_diffusers(sai) == spec.path, sai
        if base == "sdxl":  # kohya writes SAI names for SDXL only; SD1's up_blocks.0 upsampler sits at .1
            assert names.diffusers_unet_to_sai(spec.path) == sai, spec.path
        checked += 1
    assert checked > 250


def test_bfl_rules_match_the_flux_table():
    table = load_arch("flux")
    prefix = table.checkpoint_prefix["transformer"]
    checked = 0
    for spec in table.modules.values():
        if spec.component != "transformer" or spec.fused_in or not spec.checkpoint_key:
            continue
        bfl = spec.checkpoint_key[len(prefix):].removesuffix(".weight")
        assert names.bfl_to_diffusers(bfl) == spec.path, bfl
        assert names.diffusers_to_bfl(spec.path) == bfl, spec.path
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("base", ["sd1", "sdxl", "flux"])
def test_underscore_rule_recovers_every_kohya_id(base):
    """kohya ids are paths with '.' -> '_'; the compound-word rule undoes that for every table module."""
    table = load_arch(base)
    for spec in table.modules.values():
        if spec.fused_in:
            continue
        prefix, _, rest = spec.kohya.partition("_te") if "_te" in spec.kohya[:8] else ("", "", spec.kohya)
        body = rest.split("_", 1)[1] if prefix else rest[len("lora_unet_"):]
        path = names.underscore_to_path(body)
        assert path.replace(".", "_") == body
        if spec.component == "transformer":
            assert names.bfl_to_diffusers(path) == spec.path, spec.kohya
        elif spec.component == "unet":
            assert (names.sai_unet_to_diffusers(path) or path) == spec.path, spec.kohya
        else:
            assert names.text_encoder_path(path) == spec.path, spec.kohya
