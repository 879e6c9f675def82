"""LoRA Block Weight (LBW) vectors: slot orders, presets, and the parser for "1,0,0.5,..." or a preset name.

Slots per architecture (the `block` of each ModuleSpec):
- sd1/sd2: 26 slots BASE, IN00-IN11, MID, OUT00-OUT11; a 17-value vector fills BASE, IN01, IN02, IN04, IN05,
  IN07, IN08, MID, OUT03-OUT11 (the blocks that hold attention layers).
- sdxl: 20 slots BASE, IN00-IN08, MID, OUT00-OUT08; a 12-value vector fills BASE, IN04, IN05, IN07, IN08, MID,
  OUT00-OUT05.
- flux: 61 slots CLIP, T5, IN, D00-D18, S00-S37, OUT (the LBW extension's Flux order).
- sd3: 27 slots BASE, IN, J00-J23, OUT (our own naming; LBW defines none for SD3); 3.5 Large: J00-J37.
- the families described by rules (Wan, HunyuanVideo, Qwen-Image, ...): IN, their blocks (B00.., or D00../S00..
  for double and single streams), OUT, at the file's sizes (our own naming: no LBW convention exists for them).
Slots a shorter vector does not name keep weight 1 (kohya's svd_merge_lora rule).
Presets: the LBW extension's 17-value presets (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL,
ALL0.5) for sd1/sd2; NONE, ALL and ALL0.5 for every architecture.
"""

from __future__ import annotations

from loratool.errors import LoraToolError

_UNIFORM = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5}


def _lbw(arch_name: str, table=None) -> dict:
    from loratool.arch import load_arch

    return (table if table is not None else load_arch(arch_name)).lbw


def lbw_slots(arch_name: str, table=None) -> list[str]:
    """All LBW slots of an architecture, in order (``table``: the family's table at a file's sizes, for a
    family described by rules: Wan 1.3B has 30 block slots, 14B 40)."""
    return list(_lbw(arch_name, table)["slots"])


def lbw_presets(arch_name: str, table=None) -> dict[str, list[float]]:
    """Named presets of an architecture: name -> vector (of one of its vector lengths)."""
    lbw = _lbw(arch_name, table)
    out: dict[str, list[float]] = {}
    for length, presets in lbw["presets"].items():
        assert length in lbw["vectors"]
        out.update({name: [float(v) for v in values] for name, values in presets.items()})
    full = len(lbw["slots"])
    for name, value in _UNIFORM.items():
        out.setdefault(name, [value] * full)
    return out


def lbw_weights(arch_name: str, spec: str, table=None) -> dict[str, float]:
    """Parse a vector ("1,0,0,...") or a preset name into {block: weight} over all slots."""
    lbw = _lbw(arch_name, table)
    text = spec.strip()
    presets = lbw_presets(arch_name, table)
    named = {k.upper(): v for k, v in presets.items()}
    if text.upper() in named:
        values = named[text.upper()]
    else:
        try:
            values = [float(v) for v in text.replace(" ", "").split(",")]
        except ValueError:
            raise LoraToolError(
                f"block weights {spec!r}: not a preset of {arch_name} ({', '.join(presets)}) "
                "and not a comma-separated list of numbers"
            ) from None
    vectors = lbw["vectors"]
    order = vectors.get(str(len(values)))
    if order is None:
        lengths = " or ".join(sorted(vectors, key=int))
        raise LoraToolError(
            f"block weights for {arch_name} need {lengths} values, got {len(values)}: {spec!r}"
        )
    weights = {slot: 1.0 for slot in lbw["slots"]}
    weights.update(zip(order, values, strict=True))
    return weights
