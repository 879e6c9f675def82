"""The tiny world's tokenizer (fixtures/tiny-sd) keeps every word of the world whole, so captions fit."""

from __future__ import annotations

import importlib.util
import sys

import pytest


@pytest.fixture(scope="module")
def world(repo_root):
    spec = importlib.util.spec_from_file_location("trainworld_world", repo_root / "bench/trainworld/world.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_every_world_word_is_one_token_and_captions_fit(world, repo_root):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(repo_root / "fixtures/tiny-sd/tokenizer")
    split = {w: tok.tokenize(w) for w in world.WORDS if len(tok.tokenize(w)) != 1}
    assert not split, f"world words split into pieces: {split}"
    longest = max(f"a {size} {colour} {shape} {where}" for size in world.SIZES for colour in world.COLOURS
                  for shape in world.SHAPES for where in world.WHERE)
    ids = tok(longest)["input_ids"]
    assert len(ids) <= tok.model_max_length, (longest, len(ids), tok.model_max_length)
