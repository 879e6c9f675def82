"""The in-memory form of one architecture table (loratool/arch/data/tables/<name>.json).

The JSON is written by tools/gen_arch_tables.py (or, for a family described by rules, by ``rules.build_table``);
its format is described there. This module only reads it. Which family a name or a kohya id belongs to, and
how each layout spells a module, is ``registry.Family``'s business.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from functools import cached_property

from loratool.errors import LoraToolError

Rows = tuple[int, int]
# The one --targets vocabulary (extract, ratio, train): name -> what it covers. Every command lists it in its
# --help and writes the name into its output's metadata as given here.
TARGET_SETS: dict[str, str] = {
    "attn": "attention projections only (q, k, v, out; diffusers' default)",
    "transformer": "every linear layer of the transformer blocks and the text encoders' attention and MLP "
                   "(kohya's LoRA)",
    "transformer+conv": "transformer plus the ResNet blocks' convs and time projections and the samplers "
                        "(kohya's LoCon)",
    "all": "every linear and conv layer (embedders, conv_in/conv_out, projections too)",
}
TARGET_ALIASES = {"attn+conv": "transformer+conv"}  # the name extract and ratio used before
# the table groups each set takes ("attn" is the transformer blocks' group; the attn set keeps its projections)
TARGET_KINDS = {"attn": ("attn",), "transformer": ("attn",), "transformer+conv": ("attn", "conv"),
                "all": ("attn", "conv", "other")}
_PROJECTION = re.compile(r"(^|\.)(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out|to_qkv|to_added_qkv|[qkvo]_proj|"
                         r"out_proj|(Self|EncDec)Attention\.[qkvo])$")


def target_set(name: str) -> str:
    """The vocabulary's name for a ``--targets`` value (an old spelling gives its new name)."""
    found = TARGET_ALIASES.get(name, name)
    if found not in TARGET_SETS:
        raise LoraToolError(f"unknown target set {name!r}: use one of {', '.join(TARGET_SETS)}")
    return found


def is_attention_projection(path: str) -> bool:
    """A q/k/v/out projection of an attention layer, by its diffusers/transformers name."""
    return bool(_PROJECTION.search(path))


@dataclass(frozen=True)
class ParamSpec:
    """One tensor of a component (weights, biases, norms, embeddings, buffers saved by diffusers)."""

    component: str
    name: str  # diffusers name inside the component, with .weight/.bias
    shape: tuple[int, ...]
    checkpoint_key: str | None  # full single-file key
    rows: tuple[Rows, ...] | None  # None: the whole checkpoint tensor; else concat of these row ranges
    op: str | None  # None, "conv1x1" (checkpoint has trailing 1x1 dims) or "T" (checkpoint is the transpose)


@dataclass(frozen=True)
class ModuleSpec:
    """A layer a LoRA can target. `key` is the canonical "component.path"."""

    component: str
    path: str
    shape: tuple[int, ...]
    group: str  # "attn" | "conv" | "other"
    block: str | None  # LBW block
    kohya: str  # kohya module id (for a part of a fused weight: the fused module's id)
    checkpoint_key: str | None
    checkpoint_rows: Rows | None  # contiguous rows inside a fused checkpoint tensor
    row_order: tuple[Rows, ...] | None = None  # a row permutation (BFL/MMDiT final modulation), else None
    fused_in: str | None = None  # key of the fused pseudo-module holding this part
    parts: tuple[tuple[str, Rows], ...] = ()  # for a fused pseudo-module: (part key, rows)

    @property
    def key(self) -> str:
        return f"{self.component}.{self.path}"

    @property
    def kind(self) -> str:
        return "conv" if len(self.shape) == 4 else "linear"

    @property
    def is_fused(self) -> bool:
        return bool(self.parts)


def _rows(value) -> tuple[Rows, ...] | None:
    if value is None:
        return None
    if isinstance(value[0], int):
        return ((value[0], value[1]),)
    return tuple((a, b) for a, b in value)


class Arch:
    """An architecture table: modules, name maps, fused weights, LBW blocks."""

    def __init__(self, data: dict):
        self.name: str = data["name"]
        self.components: tuple[str, ...] = tuple(data["components"])
        self.all_components: tuple[str, ...] = tuple(data["tables"])  # + "vae"
        self.checkpoint_prefix: dict[str, str] = {}
        self.kohya_prefix: dict[str, str] = {}
        self._params: dict[tuple[str, str], ParamSpec] = {}
        self.modules: dict[str, ModuleSpec] = {}
        self.fused: dict[str, list[tuple[str, Rows]]] = {}
        self.lbw: dict = data["lbw"]
        self._extra = [re.compile(p) for p in data["checkpoint_extra"]]
        for comp, table in data["tables"].items():
            self._load_component(comp, table)
        for key, f in data["fused"].items():
            self._load_fused(key, f)
        if self.fused:  # table order: a fused pseudo-module right before its first part
            first = {parts[0][0]: key for key, parts in self.fused.items()}
            order: dict[str, ModuleSpec] = {}
            for key, spec in self.modules.items():
                if key in first:
                    order[first[key]] = self.modules[first[key]]
                order.setdefault(key, spec)
            self.modules = order

    @property
    def params(self) -> dict[tuple[str, str], ParamSpec]:
        """(component, diffusers name) -> every tensor of the model (vae included)."""
        packed = self.__dict__.pop("_packed_params", None)
        if packed is not None:
            self._params = pickle.loads(packed)  # noqa: S301 - packed by __getstate__ of this very table
        return self._params

    def __getstate__(self) -> dict:
        """The table as ``arch/cache.py`` stores it: the parameter map travels packed, unpacked when first
        used. Only checkpoint work (merge, extract, conversions) uses it, and it is half a bundle's load."""
        state = dict(self.__dict__)
        state["_packed_params"] = pickle.dumps(self.params, protocol=pickle.HIGHEST_PROTOCOL)
        del state["_params"]
        return state

    def _load_component(self, comp: str, table: dict) -> None:
        prefix = table["checkpoint_prefix"]
        self.checkpoint_prefix[comp] = prefix
        if table["kohya_prefix"]:
            self.kohya_prefix[comp] = table["kohya_prefix"]
        for name, shape, ckey, rows, op in table["params"]:
            self._params[(comp, name)] = ParamSpec(comp, name, tuple(shape), prefix + ckey if ckey else None,
                                                  _rows(rows), op)
        for path, group, block, kohya in table["modules"]:
            p = self._params[(comp, path + ".weight")]
            rows = p.rows if p.rows and len(p.rows) == 1 else None
            order = p.rows if p.rows and len(p.rows) > 1 else None
            spec = ModuleSpec(comp, path, p.shape, group, block, f"{table['kohya_prefix']}_{kohya}",
                              p.checkpoint_key, rows[0] if rows else None, order)
            self.modules[spec.key] = spec

    def _load_fused(self, key: str, f: dict) -> None:
        comp, _, path = key.partition(".")
        parts = tuple((p, (a, b)) for p, a, b in f["parts"])
        self.fused[key] = list(parts)
        ckey = self.checkpoint_prefix[comp] + f["checkpoint_key"]
        self.modules[key] = ModuleSpec(comp, path, tuple(f["shape"]), f["group"], f["block"],
                                       f"{self.kohya_prefix[comp]}_{f['kohya']}", ckey, None, parts=parts)
        for part, _ in parts:
            old = self.modules[part]
            self.modules[part] = ModuleSpec(**{**old.__dict__, "fused_in": key})

    # ------------------------------------------------------------------ targets and kohya names
    def targets(self, kind: str = "attn", fused: bool = True,
                components: tuple[str, ...] | None = None) -> list[ModuleSpec]:
        """Modules for ``--targets`` (``TARGET_SETS``), in table order.

        With fused=True (kohya's granularity) a fused pseudo-module stands for its parts; with False
        the parts (diffusers' granularity) are listed instead. A fused module is an attention projection
        when one of its parts is (Flux's single-block linear1 holds q, k, v and the MLP's input)."""
        kind = target_set(kind)
        groups = TARGET_KINDS[kind]
        out = []
        for spec in self.modules.values():
            if spec.group not in groups or (components and spec.component not in components):
                continue
            if (spec.is_fused and not fused) or (spec.fused_in and fused):
                continue
            if kind == "attn" and not any(is_attention_projection(p.split(".", 1)[1])
                                          for p in ([k for k, _ in spec.parts] or [spec.key])):
                continue
            out.append(spec)
        return out

    def to_kohya(self, key: str) -> str:
        spec = self.modules.get(key)
        if spec is None:
            raise LoraToolError(f"{key} is not a module of {self.name}")
        return spec.kohya

    # ------------------------------------------------------------------ single-file checkpoints
    @cached_property
    def checkpoint_map(self) -> dict[str, list[tuple[str, Rows | None]]]:
        """Single-file weight key -> [(canonical module key, rows)] for every targetable module."""
        out: dict[str, list[tuple[str, Rows | None]]] = {}
        for spec in self.modules.values():
            if spec.checkpoint_key:
                entry = (spec.key, spec.checkpoint_rows)
                out.setdefault(spec.checkpoint_key, []).append(entry)
        for entries in out.values():
            entries.sort(key=lambda e: (e[1] is not None, e[1] or (0, 0)))
        return out

    @cached_property
    def checkpoint_params(self) -> dict[str, list[ParamSpec]]:
        """Single-file key -> the diffusers tensors it holds (several for a fused tensor)."""
        out: dict[str, list[ParamSpec]] = {}
        for p in self.params.values():
            if p.checkpoint_key:
                out.setdefault(p.checkpoint_key, []).append(p)
        return out

    def diffusers_param_map(self, component: str | None = None) -> dict[tuple[str, str], ParamSpec]:
        """(component, diffusers name) -> ParamSpec, for all tensors (vae included) or one component.

        Together with `checkpoint_params` (the reverse direction) and loratool.arch.convert (which splits
        and joins the tensors) this is the full single-file <-> diffusers folder map."""
        return {k: v for k, v in self.params.items() if component is None or k[0] == component}

    def checkpoint_shape(self, key: str) -> tuple[int, ...] | None:
        """The shape a single-file checkpoint stores for `key`, or None if the key is not ours."""
        params = self.checkpoint_params.get(key)
        if not params:
            return None
        p = params[0]
        if p.op == "T":
            return tuple(reversed(p.shape))
        if p.op == "conv1x1":
            return (*p.shape, 1, 1)
        if p.rows is None or len(p.rows) > 1:
            return p.shape
        return (max(q.rows[0][1] for q in params), *p.shape[1:])

    def is_checkpoint_extra(self, key: str) -> bool:
        """A single-file key that is known but has no diffusers counterpart (scheduler buffers, EMA, ...)."""
        return any(rx.search(key) for rx in self._extra)
