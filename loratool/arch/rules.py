"""A family described by rules instead of an enumerated table: blocks x count, linear names, renames, offsets.

Large families come in several sizes (Wan 1.3B/14B, SD3.5 Medium/Large); listing every module of every size
would be huge. An entry may instead carry ``"rules"``, from which :func:`build_table` writes the same table
that tools/gen_arch_tables.py generates (modules with shapes, single-file keys and rows, kohya ids, LBW blocks,
fused groups), for sizes given in the entry or read off a file's shapes (:func:`infer_sizes`)::

    "rules": {
      "sizes": {"H": 3072, "D": 19},                          # defaults
      "infer": {"H": ["transformer.transformer_blocks.{i}.attn.to_out.0", 0],   # a module's dim ...
                "D": ["transformer.transformer_blocks.{i}"]},                   # ... or a block count
      "components": {"transformer": {
         "checkpoint_prefix": "model.diffusion_model.", "kohya_prefix": "lora_unet",
         "groups": [
           {"count": "D", "diffusers": "transformer_blocks.{i}", "original": "double_blocks.{i}",
            "block": "D{i:02d}", "group": "attn", "fused": {"img_attn.qkv": "attn.to_qkv"},
            "linears": [["attn.to_q", "img_attn.qkv", ["H", "H"], [0, "H"]],   # diffusers, original, shape, rows
                        ["attn.to_out.0", "img_attn.proj", ["H", "H"]]]},
           {"diffusers": "", "original": "", "block": "OUT", "group": "other",
            "linears": [["norm_out.linear", "final_layer.adaLN_modulation.1", ["2*H", "H"], [["H", "2*H"], [0, "H"]]]]}
         ]}},
      "lbw": {"slots": [...], "vectors": {...}, "presets": {}}
    }

Sizes are names; a dimension is an integer, a size, or ``k*NAME`` / ``A+B`` of those. ``rows`` is one range
(the linear is that slice of a fused single-file weight) or several (a row permutation of the whole weight).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from loratool.errors import LoraToolError

_TERM = re.compile(r"^\s*(?:(\d+)\s*\*\s*)?([A-Za-z_]\w*|\d+)\s*$")


def dim(value: int | str, sizes: Mapping[str, int]) -> int:
    """``3072``, ``"H"``, ``"4*H"``, ``"H+64"`` with ``sizes``."""
    if isinstance(value, int):
        return value
    total = 0
    for term in str(value).split("+"):
        m = _TERM.match(term)
        if m is None:
            raise LoraToolError(f"architecture rule: cannot read the size {value!r}")
        factor = int(m.group(1) or 1)
        name = m.group(2)
        if name.isdigit():
            total += factor * int(name)
        elif name in sizes:
            total += factor * int(sizes[name])
        else:
            raise LoraToolError(f"architecture rule: unknown size {name!r} in {value!r}")
    return total


def _rows(spec, sizes) -> list | None:
    if spec is None:
        return None
    if spec and isinstance(spec[0], list):
        return [[dim(a, sizes), dim(b, sizes)] for a, b in spec]
    return [dim(spec[0], sizes), dim(spec[1], sizes)]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _group_rows(comp: str, table: dict, group: dict, sizes: Mapping[str, int], fused: dict) -> None:
    count = dim(group["count"], sizes) if "count" in group else 1
    for i in range(count):
        where = {"i": i}
        base_d, base_o = group.get("diffusers", "").format(**where), group.get("original", "").format(**where)
        block = group.get("block", "").format(**where) or None
        parts_of: dict[str, list] = {}
        for linear in group["linears"]:
            name, original, shape = linear[0], linear[1], [dim(s, sizes) for s in linear[2]]
            rows = _rows(linear[3] if len(linear) > 3 else None, sizes)
            path, ckey = _join(base_d, name), _join(base_o, original)
            table["params"].append([f"{path}.weight", shape, f"{ckey}.weight", rows, None])
            table["modules"].append([path, group.get("group", "other"), block, ckey.replace(".", "_")])
            if rows is not None and not isinstance(rows[0], list):
                parts_of.setdefault(original, []).append((f"{comp}.{path}", rows, shape))
        for original, parts in parts_of.items():
            pseudo = group.get("fused", {}).get(original)
            if pseudo is None:
                raise LoraToolError(f"architecture rule: {original} is split into rows but has no fused name")
            ckey = _join(base_o, original)
            parts.sort(key=lambda p: p[1][0])
            fused[f"{comp}.{_join(base_d, pseudo)}"] = {
                "shape": [max(r[1] for _, r, _ in parts), parts[0][2][1]], "checkpoint_key": f"{ckey}.weight",
                "group": group.get("group", "other"), "block": block, "kohya": ckey.replace(".", "_"),
                "parts": [[key, r[0], r[1]] for key, r, _ in parts]}


def build_table(name: str, rules: Mapping, sizes: Mapping[str, int] | None = None) -> dict:
    """The table (the generated tables' format) of a family described by rules, at ``sizes`` (else defaults)."""
    use = {**rules.get("sizes", {}), **(sizes or {})}
    tables: dict[str, dict] = {}
    fused: dict[str, dict] = {}
    for comp, spec in rules["components"].items():
        table = {"checkpoint_prefix": spec.get("checkpoint_prefix", ""), "kohya_prefix": spec.get("kohya_prefix"),
                 "params": [], "modules": []}
        for group in spec["groups"]:
            _group_rows(comp, table, group, use, fused)
        tables[comp] = table
    return {"name": name, "components": list(tables), "tables": tables, "fused": fused,
            "checkpoint_extra": list(rules.get("checkpoint_extra", [])),
            "lbw": rules.get("lbw", {"slots": [], "vectors": {}, "presets": {}})}


def infer_sizes(rules: Mapping, dims: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Sizes read off a file's modules (canonical key -> weight dims): a module's dimension, or how many
    blocks of a pattern appear. Sizes no module shows keep their defaults."""
    out: dict[str, int] = {}
    for size, how in rules.get("infer", {}).items():
        pattern = re.compile(re.escape(how[0]).replace(re.escape("{i}"), r"(\d+)") + (r"(?:\.|$)" if len(how) == 1
                                                                                      else "$"))
        if len(how) == 1:
            seen = [int(m.group(1)) for k in dims if (m := pattern.match(k))]
            if seen:
                out[size] = max(seen) + 1
            continue
        for key, shape in dims.items():
            if pattern.match(key) and shape is not None and len(shape) > how[1]:
                out[size] = int(shape[how[1]])
                break
    return out
