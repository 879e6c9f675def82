"""LoRA Block Weight (LBW) vectors: slot orders, presets, and the parser for "1,0,0.5,..." or a preset name.

Slots per architecture (the `block` of each ModuleSpec):
- sd1/sd2: 26 slots BASE, IN00-IN11, MID, OUT00-OUT11; a 17-value vector fills BASE, IN01, IN02, IN04, IN05,
  IN07, IN08, MID, OUT03-OUT11 (the blocks that hold attention layers).
- sdxl: 20 slots BASE, IN00-IN08, MID, OUT00-OUT08; a 12-value vector fills BASE, IN04, IN05, IN07, IN08, MID,
  OUT00-OUT05.
- flux: 61 slots CLIP, T5, IN, D00-D18, S00-S37, OUT (the LBW extension's Flux order).
- sd3: 27 slots BASE, IN, J00-J23, OUT (our own naming; LBW defines none for SD3).
Slots a shorter vector does not name keep weight 1 (kohya's svd_merge_lora rule).
Presets: the LBW extension's 17-value presets (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL,
ALL0.5) for sd1/sd2; NONE, ALL and ALL0.5 for every architecture.
"""

from __future__ import annotations

from loratool.errors import LoraToolError

_UNIFORM = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5}


def lbw_slots(arch_name: str) -> list[str]:
    """All LBW slots of an architecture, in order."""
    from loratool.arch import load_arch

    return list(load_arch(arch_name).lbw["slots"])


def lbw_presets(arch_name: str) -> dict[str, list[float]]:
    """Named presets of an architecture: name -> vector (of one of its vector lengths)."""
    from loratool.arch import load_arch

    lbw = load_arch(arch_name).lbw
    out: dict[str, list[float]] = {}
    for length, presets in lbw["presets"].items():
        assert length in lbw["vectors"]
        out.update({name: [float(v) for v in values] for name, values in presets.items()})
    full = len(lbw["slots"])
    for name, value in _UNIFORM.items():
        out.setdefault(name, [value] * full)
    return out


def lbw_weights(arch_name: str, spec: str) -> dict[str, float]:
    """Parse a vector ("1,0,0,...") or a preset name into {block: weight} over all slots."""
    from loratool.arch import load_arch

    lbw = load_arch(arch_name).lbw
    text = spec.strip()
    presets = lbw_presets(arch_name)
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
