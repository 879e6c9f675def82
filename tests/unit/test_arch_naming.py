"""The families' algorithmic name rules (loratool/arch/families/) agree with the generated tables on every
module the tables list, so a table and a rule can never name one module two ways; and kohya's underscored ids
come back through the vocabulary the tables supply."""

from __future__ import annotations

import pytest

from loratool.arch import family, load_arch
from loratool.arch import naming as N
from loratool.arch.families import ldm_unet
from loratool.arch.registry import vocabulary


def _original(table, spec) -> str:
    return spec.checkpoint_key[len(table.checkpoint_prefix[spec.component]):].removesuffix(".weight")


@pytest.mark.parametrize("base", ["sd1", "sd2", "sdxl"])
def test_ldm_rules_match_the_tables(base):
    table = load_arch(base)
    up_attn = [any(k.startswith(f"unet.up_blocks.{i}.attentions.") for k in table.modules) for i in range(4)]
    checked = 0
    for spec in table.modules.values():
        if spec.component != "unet" or not spec.checkpoint_key:
            continue
        original = _original(table, spec)
        assert ldm_unet.original_to_diffusers(original) == spec.path, original
        assert ldm_unet.diffusers_to_original(spec.path, up_has_attn=up_attn) == original, spec.path
        checked += 1
    assert checked > 250


@pytest.mark.parametrize("base", ["flux", "sd3"])
def test_dit_renames_match_the_tables(base):
    """The entries' rename tables name every single-file module of the generated tables."""
    table, rules = load_arch(base), family(base).naming
    checked = 0
    for spec in table.modules.values():
        if spec.component != "transformer" or spec.fused_in or not spec.checkpoint_key:
            continue
        original = _original(table, spec)
        assert rules.original_to_diffusers(original) == spec.path, original
        assert rules.diffusers_to_original(spec.path) == original, spec.path
        checked += 1
    assert checked > 150


@pytest.mark.parametrize("base", ["sd1", "sdxl", "flux", "sd3"])
def test_every_kohya_id_reads_back_by_rule_alone(base):
    """kohya ids are paths with '.' -> '_'; the vocabulary undoes that for every table module, and the family's
    rules (not its table) name the module."""
    table, fam = load_arch(base), family(base)
    words = vocabulary()
    for spec in table.modules.values():
        if spec.fused_in:
            continue
        scope = table.kohya_prefix[spec.component]
        body = spec.kohya[len(scope) + 1:]
        path = N.underscore_to_path(body, words)
        assert N.path_to_underscore(path) == body
        if spec.component.startswith("text_encoder"):
            assert N.text_encoder_path(path) == spec.path, spec.kohya
            continue
        place = fam._denoiser_place(spec.component, path, original_ok=True)
        assert place is not None and place.path == spec.path, spec.kohya


def test_block_labels():
    assert N.block_label("unet", "down_blocks.1.attentions.0.proj_in") == "unet:down_blocks.1"
    assert N.block_label("text_encoder", "text_model.encoder.layers.5.mlp.fc1") == "text_encoder:layers.5"
    assert N.block_label("unet", "mid_block.attentions.0.proj_in") == "unet:mid_block"
