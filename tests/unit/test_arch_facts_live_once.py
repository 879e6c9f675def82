"""Outside loratool/arch/, no Python file names a family's blocks (issue 13): the registry is the one place a
family's block names, prefixes and fused groups are spelt, so that adding a family is adding an entry."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "loratool"
BLOCK_NAMES = ("double_blocks", "single_blocks", "joint_blocks", "context_block", "x_block", "input_blocks",
               "middle_block", "output_blocks", "down_blocks", "mid_block", "up_blocks", "transformer_blocks",
               "single_transformer_blocks", "attentions", "resnets", "text_model", "encoder.block", "img_attn",
               "txt_attn", "img_mlp", "txt_mlp", "final_layer", "label_emb", "time_embed")
# a name counts wherever it stands as a word of a path or of a kohya id (after '.', '_' or a quote)
PATTERN = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(n) for n in BLOCK_NAMES) + r")(?![A-Za-z])")


def test_no_block_name_outside_the_registry():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "arch":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in PATTERN.finditer(line):
                found.append(f"{rel}:{number}: {match.group(1)}")
    assert found == [], "family block names outside loratool/arch/:\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for():
    for text in ("lora_unet_double_blocks_0", '"down_blocks."', "m.path.startswith('encoder.block.')",
                 "x.text_model.y"):
        assert PATTERN.search(text), text
    for text in ("ax_blocks", "setup_blocks", "grid_blocks"):
        assert not PATTERN.search(text), text
