"""A family described by rules instead of an enumerated table: blocks x count, linear names, renames, offsets.

Large families come in several sizes (Wan 1.3B/5B/14B, SD3.5 Medium/Large); listing every module of every size
would be huge. An entry may instead carry ``"rules"``, from which :func:`build_table` writes the same table
that tools/gen_arch_tables.py generates (modules with shapes, single-file keys and rows, kohya ids, LBW blocks,
fused groups), for sizes given in the entry or read off a file's shapes (:func:`fit_sizes`)::

    "rules": {
      "sizes": {"H": 3072, "D": 19},                          # defaults
      "variants": {"dev": {"H": 3072, "D": 19}},              # the sizes real checkpoints have, by label
      "infer": {"H": [["transformer.transformer_blocks.{i}.attn.to_out.0", 0],   # a module's dim (first found)
                      ["transformer.transformer_blocks.{i}.attn.to_qkv", 1]],
                "D": ["transformer.transformer_blocks.{i}"],                      # ... a block count
                "I": ["transformer.blocks.{i}.attn2.add_k_proj", "present"]},     # ... 1 when present
      "components": {"transformer": {
         "checkpoint_prefix": "model.diffusion_model.", "kohya_prefix": "lora_unet",
         "groups": [
           {"count": "D", "diffusers": "transformer_blocks.{i}", "original": "double_blocks.{i}",
            "block": "D{i:02d}", "group": "attn", "fused": {"img_attn.qkv": "attn.to_qkv"},
            "kohya": {"img_mlp.fc1": "img_mlp.0"},              # kohya ids with other names than the single file
            "linears": [["attn.to_q", "img_attn.qkv", ["H", "H"], [0, "H"]],   # diffusers, original, shape, rows
                        ["attn.to_out.0", "img_attn.proj", ["H", "H"]]]},
           {"range": ["X", "D-1"], "when": "I", ...},          # blocks X .. D-2; only when size I is not 0
           {"diffusers": "", "original": "", "block": "OUT", "group": "other",
            "linears": [["norm_out.linear", "final_layer.adaLN_modulation.1", ["2*H", "H"], [["H", "2*H"], [0, "H"]]]]}
         ]}},
      "lbw": {"slots": ["IN", {"each": "D", "name": "D{i:02d}"}, "OUT"], "presets": {}}
    }

Sizes are names; a dimension is an integer, a size, or an expression of them with ``+ - * /`` (``4*H``,
``3*H+M``, ``D-1``, ``H/3``). ``rows`` is one range (the linear is that slice of a fused single-file weight) or
several (a row permutation of the whole weight). An entry may have both a generated ``table`` and ``rules`` for
some of its components (SD3: its transformer varies in size, its text encoders do not): the rules replace those
components of the table.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from functools import cache, lru_cache

from loratool.errors import LoraToolError

_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)  # what a size expression may do ("/" is "//")


@cache
def _compiled(value: str):
    """A size expression as code, checked to hold only integers, size names and + - * / // (``/`` divides
    whole numbers), compiled once: a family's table evaluates the same few dozen expressions thousands of
    times."""
    def bad() -> LoraToolError:
        return LoraToolError(f"architecture rule: cannot read the size {value!r}")

    try:
        tree = ast.parse(value, mode="eval")
    except SyntaxError:
        raise bad() from None
    for node in ast.walk(tree.body):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            node.op = ast.FloorDiv() if isinstance(node.op, ast.Div) else node.op
        elif not (isinstance(node, ast.Name | ast.Load | ast.operator)
                  or (isinstance(node, ast.Constant) and type(node.value) is int)):
            raise bad()
    return compile(tree, f"<size {value}>", "eval")


def dim(value: int | str, sizes: Mapping[str, int]) -> int:
    """``3072``, ``"H"``, ``"4*H"``, ``"3*H+M"``, ``"D-1"`` with ``sizes``."""
    if isinstance(value, int):
        return value
    code = _compiled(str(value))
    try:
        return int(eval(code, {"__builtins__": {}}, sizes))  # noqa: S307 - checked: integers, names, arithmetic
    except NameError as e:
        raise LoraToolError(f"architecture rule: unknown size {e.name!r} in {value!r}") from None


def _rows(spec, sizes) -> list | None:
    if spec is None:
        return None
    if spec and isinstance(spec[0], list):
        return [[dim(a, sizes), dim(b, sizes)] for a, b in spec]
    return [dim(spec[0], sizes), dim(spec[1], sizes)]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def group_indices(group: Mapping, sizes: Mapping[str, int]) -> range:
    """The block indices a group covers at ``sizes`` (one pass, index 0, for a group without blocks)."""
    if "when" in group and not dim(group["when"], sizes):
        return range(0)
    if "range" in group:
        return range(max(0, dim(group["range"][0], sizes)), max(0, dim(group["range"][1], sizes)))
    return range(dim(group["count"], sizes) if "count" in group else 1)


def _group_rows(comp: str, table: dict, group: dict, sizes: Mapping[str, int], fused: dict) -> None:
    kohya_names = group.get("kohya", {})
    for i in group_indices(group, sizes):
        where = {"i": i}
        base_d, base_o = group.get("diffusers", "").format(**where), group.get("original", "").format(**where)
        block = group.get("block", "").format(**where) or None
        parts_of: dict[str, list] = {}
        for linear in group["linears"]:
            name, original, shape = linear[0], linear[1], [dim(s, sizes) for s in linear[2]]
            rows = _rows(linear[3] if len(linear) > 3 else None, sizes)
            path, ckey = _join(base_d, name), _join(base_o, original)
            kohya = _join(base_o, kohya_names.get(original, original)).replace(".", "_")
            table["params"].append([f"{path}.weight", shape, f"{ckey}.weight", rows, None])
            table["modules"].append([path, group.get("group", "other"), block, kohya])
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
                "group": group.get("group", "other"), "block": block,
                "kohya": _join(base_o, kohya_names.get(original, original)).replace(".", "_"),
                "parts": [[key, r[0], r[1]] for key, r, _ in parts]}


def _lbw(spec: Mapping | None, sizes: Mapping[str, int]) -> dict:
    if not spec:
        return {"slots": [], "vectors": {}, "presets": {}}
    slots: list[str] = []
    for slot in spec.get("slots", ()):
        if isinstance(slot, str):
            slots.append(slot)
        else:
            slots += [slot["name"].format(i=i) for i in range(dim(slot["each"], sizes))]
    return {"slots": slots, "vectors": {str(len(slots)): slots}, "presets": dict(spec.get("presets", {}))}


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
            "checkpoint_extra": list(rules.get("checkpoint_extra", [])), "lbw": _lbw(rules.get("lbw"), use)}


def merge_tables(generated: dict, ruled: dict) -> dict:
    """A generated table whose components the rules describe replaced by the rules' (SD3's transformer)."""
    ours = set(ruled["tables"])
    tables = {c: (ruled["tables"][c] if c in ours else t) for c, t in generated["tables"].items()}
    fused = {k: v for k, v in generated["fused"].items() if k.partition(".")[0] not in ours}
    fused.update(ruled["fused"])
    lbw = ruled["lbw"] if ruled["lbw"]["slots"] else generated["lbw"]
    return {**generated, "tables": tables, "fused": fused, "lbw": lbw,
            "checkpoint_extra": list(dict.fromkeys([*generated["checkpoint_extra"], *ruled["checkpoint_extra"]]))}


@lru_cache(maxsize=1024)
def _pattern(template: str, exact: bool) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + ("$" if exact else r"(?:\.|$)"))


def _ways(how) -> list:
    """An ``infer`` entry as a list of ways: ``[pattern]`` (a block count), ``[pattern, axis]`` (a module's
    dim), ``[pattern, "present"]`` (1 when a module is there), or a list of such ways tried in order."""
    return how if how and isinstance(how[0], list) else [how]


def infer_sizes(rules: Mapping, dims: Mapping[str, tuple[int, ...] | None]) -> dict[str, int]:
    """Sizes read off a file's modules (canonical key -> weight dims): a module's dimension, how many blocks of a
    pattern appear, or whether a module is there. Sizes no module shows are left out."""
    out: dict[str, int] = {}
    for size, how in rules.get("infer", {}).items():
        for way in _ways(how):
            if len(way) == 1 or way[1] == "present":
                pattern = _pattern(way[0], exact=len(way) > 1)
                seen = [int(m.group(1)) if m.groups() else 0 for k in dims if (m := pattern.match(k))]
                if seen:
                    out[size] = 1 if len(way) > 1 else max(seen) + 1
            else:
                pattern = _pattern(way[0], exact=True)
                for key, shape in dims.items():
                    if pattern.match(key) and shape is not None and len(shape) > way[1]:
                        out[size] = int(shape[way[1]])
                        break
            if size in out:
                break
    return out


def _counts(rules: Mapping) -> frozenset[str]:
    """Sizes inferred as counts (blocks seen, or presence): a file shows at most as many as the model has."""
    return frozenset(s for s, how in rules.get("infer", {}).items()
                     if all(len(w) == 1 or w[1] == "present" for w in _ways(how)))


def fit_sizes(rules: Mapping, dims: Mapping[str, tuple[int, ...] | None]) -> tuple[str | None, dict[str, int]]:
    """The variant a file's modules fit (its label, None when none does) and the sizes to build the table at.

    A variant fits when every width the file shows is the variant's and no count exceeds it; its sizes are
    used whole (a LoRA of the first blocks of a 40-block model is still a 40-block model). Without a fitting
    variant the sizes are the file's, over the defaults."""
    found = infer_sizes(rules, dims)
    counts = _counts(rules)
    defaults = dict(rules.get("sizes", {}))
    for label, variant in rules.get("variants", {}).items():
        sizes = {**defaults, **variant}
        if all(value <= sizes.get(s, value) if s in counts else value == sizes.get(s, value)
               for s, value in found.items() if s in variant or s in counts):
            return label, {**sizes, **{s: v for s, v in found.items() if s not in variant and s not in counts}}
    return None, {**defaults, **found}
