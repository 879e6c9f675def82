"""Parameter counts, reduction ratios, file sizes and training-memory estimates for LoRA.

The seed formula: a layer with a ``d×k`` weight has ``d·k`` parameters when fully fine-tuned and
``r·(d+k)`` as a rank-``r`` LoRA (``up [d, r]`` and ``down [r, k]``), so the reduction ratio is

    d·k / (r·(d + k))

A ``kh×kw`` conv with ``out`` and ``in`` channels counts as ``d = out``, ``k = in·kh·kw``: the full
weight has ``out·in·kh·kw`` parameters and kohya's conv LoRA ``r·(in·kh·kw + out)``.
For a square layer (``d = k``) at ``r = d/10`` the ratio is ``d² / (2d²/10) = 5``, not 10: the
"roughly 10x" of the seed text forgets that both factors count.

Everything here is exact arithmetic on shapes (Python ints): of single layers, of an architecture
table's targeted layers (the ``ratio`` command's three modes: ``shape_report``, ``model_report``,
``file_report``), of an adapter already read. Nothing reads a file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MIB = 1 << 20

# bytes per parameter for each precision the memory estimate knows
#   fp32:       weights 4, gradients 4, Adam first and second moments 4 + 4
#   fp16-mixed: weights 2, gradients 2, Adam moments kept in fp32 4 + 4 (no fp32 master copy)
PRECISIONS: dict[str, dict[str, int]] = {
    "fp32": {"weight": 4, "grad": 4, "adam": 8},
    "fp16-mixed": {"weight": 2, "grad": 2, "adam": 8},
}


def layer_dims(shape: Sequence[int]) -> tuple[int, int]:
    """``(d, k)`` of a weight: ``d`` = rows (out features / out channels), ``k`` = the rest
    (in features, or ``in·kh·kw`` for a conv)."""
    if len(shape) < 2:
        raise ValueError(f"a layer weight has at least 2 dims, got shape {tuple(shape)}")
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def full_params(shape: Sequence[int]) -> int:
    """Parameters of the full weight: ``d·k``."""
    d, k = layer_dims(shape)
    return d * k


def lora_params(shape: Sequence[int], rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA on this layer: ``r·(d + k)``."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    d, k = layer_dims(shape)
    return rank * (d + k)


def reduction_ratio(full: int, adapter: int) -> float | None:
    """``full / adapter``; None when the adapter has no parameters."""
    return None if adapter <= 0 else full / adapter


@dataclass(frozen=True)
class RatioRow:
    """One rank's line of a ratio table."""

    rank: int
    full: int  # Σ d·k over the layers
    lora: int  # Σ r·(d+k)
    layers: int

    @property
    def ratio(self) -> float | None:
        return reduction_ratio(self.full, self.lora)

    def as_dict(self) -> dict[str, object]:
        return {"rank": self.rank, "layers": self.layers, "full_params": self.full,
                "lora_params": self.lora, "ratio": self.ratio}


def shapes_table(shapes: Sequence[Sequence[int]], ranks: Iterable[int]) -> list[RatioRow]:
    """Per rank: full and LoRA parameter counts of a set of layers, every layer at that rank."""
    full = sum(full_params(s) for s in shapes)
    return [RatioRow(int(r), full, sum(lora_params(s, int(r)) for s in shapes), len(shapes)) for r in ranks]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1280x1280"`` -> ``(1280, 1280)``; a conv as ``out x in x kh x kw`` (``"320x320x3x3"``)."""
    parts = text.lower().replace("×", "x").replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"cannot read shape {text!r}: use DxK (e.g. 1280x1280) or OUTxINxKHxKW") from None
    if len(shape) not in (2, 4) or any(s <= 0 for s in shape):
        raise ValueError(f"cannot read shape {text!r}: 2 or 4 positive sizes, e.g. 1280x1280 or 320x320x3x3")
    return shape


# -- sizes and memory --------------------------------------------------------------------------


def file_bytes(lora: int, modules: int, bytes_per_value: int) -> int:
    """Tensor data of a kohya-style file: every factor plus one alpha scalar per module, all in
    one dtype. The JSON header (about a hundred bytes per tensor) is not counted."""
    return (lora + modules) * bytes_per_value


def training_memory(trainable: int, frozen: int, precision: str) -> dict[str, int]:
    """Bytes for weights, gradients and Adam states (nothing else: no activations, no framework
    overhead, no fp32 master copy).

    ``trainable`` parameters need a weight, a gradient and two Adam moments; ``frozen`` ones
    only a weight. See :data:`PRECISIONS` for the bytes each takes.
    """
    try:
        b = PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})") from None
    weights = (trainable + frozen) * b["weight"]
    grads = trainable * b["grad"]
    adam = trainable * b["adam"]
    return {"weights": weights, "gradients": grads, "adam": adam, "total": weights + grads + adam}


def memory_estimate(trainable: int, frozen: int, lora: int) -> dict[str, dict[str, dict[str, int]]]:
    """Per precision: a full fine-tune (``trainable`` model weights trained, ``frozen`` kept) vs a
    LoRA of ``lora`` parameters trained on top of the whole frozen model."""
    return {
        p: {"full": training_memory(trainable, frozen, p), "lora": training_memory(lora, trainable + frozen, p)}
        for p in PRECISIONS
    }


def model_rows(
    target_shapes: Sequence[Sequence[int]], ranks: Iterable[int], trainable: int, frozen: int = 0
) -> list[dict[str, object]]:
    """The ``ratio --model`` table: per rank, LoRA parameters, file sizes, ratio and the memory
    estimate (``trainable``/``frozen``: the model weights a full fine-tune trains / keeps)."""
    rows = []
    for row in shapes_table(target_shapes, ranks):
        d = row.as_dict()
        d["fp16_mib"] = file_bytes(row.lora, row.layers, 2) / MIB
        d["fp32_mib"] = file_bytes(row.lora, row.layers, 4) / MIB
        d["memory_bytes"] = memory_estimate(trainable, frozen, row.lora)
        rows.append(d)
    return rows


# -- an adapter as it is -----------------------------------------------------------------------


def module_trained_params(module) -> int:
    """Parameters a module stores: its factors, a DoRA magnitude and a bias change (alpha, a
    hyper-parameter, is not counted)."""
    seen: dict[int, int] = {}
    parts = list(module.tensors())
    if module.dora is not None:
        parts.append(module.dora.magnitude)
    if module.bias is not None:
        parts.append(module.bias)
    for t in parts:
        seen[id(t)] = t.numel()
    return sum(seen.values())


def module_full_params(module) -> int:
    """Parameters of the weight the module changes (``d·k``; a norm's weight as it is)."""
    return math.prod(int(s) for s in module.weight_shape)


def adapter_ratio(adapter) -> dict[str, object]:
    """Per component and in total: Σ d·k of the adapted weights, the adapter's parameters and
    their ratio. Reads shapes only, never tensor values."""
    per: dict[str, list[int]] = {}
    for m in adapter.modules.values():
        acc = per.setdefault(m.component, [0, 0, 0])
        acc[0] += 1
        acc[1] += module_full_params(m)
        acc[2] += module_trained_params(m)

    def entry(n: int, full: int, params: int) -> dict[str, object]:
        return {"modules": n, "full_params": full, "adapter_params": params,
                "ratio": reduction_ratio(full, params)}

    comps = {c: entry(*v) for c, v in sorted(per.items())}
    total = entry(*(sum(v[i] for v in per.values()) for i in range(3)))
    return {"components": comps, "total": total}


# -- the ratio command's three modes -----------------------------------------------------------


def shape_report(shapes: Sequence[Sequence[int]], ranks: Iterable[int]) -> dict[str, object]:
    """Per layer shape and rank: d, k, full and LoRA parameters, ratio."""
    ranks = list(ranks)
    rows = []
    for shape in shapes:
        d, k = layer_dims(shape)
        for row in shapes_table([shape], ranks):
            rows.append({"shape": list(shape), "d": d, "k": k, **row.as_dict()})
    return {"mode": "shape", "rows": rows}


def default_components(arch) -> tuple[str, ...]:
    """kohya's defaults: every component but T5 (trained only with ``train_t5xxl``): the family's entry."""
    from loratool.arch import family

    return family(arch.name).default_components


def pick_components(arch, text: str) -> tuple[str, ...]:
    """``default``, ``all`` or a comma list of the architecture's components (ValueError otherwise)."""
    if text == "default":
        return default_components(arch)
    if text == "all":
        return tuple(arch.components)
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in chosen if c not in arch.components]
    if bad or not chosen:
        raise ValueError(f"{', '.join(bad) or text!r}: {arch.name} has {', '.join(arch.components)}")
    return chosen


def model_totals(arch, components: tuple[str, ...]) -> tuple[int, int]:
    """(weights a full fine-tune of ``components`` trains, weights it keeps frozen: the other
    components and the VAE) of an architecture table."""
    trainable = frozen = 0
    for (component, _name), p in arch.diffusers_param_map().items():
        n = math.prod(p.shape)
        if component in components:
            trainable += n
        else:
            frozen += n
    return trainable, frozen


def model_report(arch, targets: str, components: tuple[str, ...], ranks: Iterable[int]) -> dict[str, object]:
    """An architecture's ``targets`` layers in ``components``, per rank: LoRA parameters, file sizes,
    ratio and the training-memory estimate."""
    specs = arch.targets(targets, components=components)
    shapes = [s.shape for s in specs]
    trainable, frozen = model_totals(arch, components)
    per_comp: dict[str, int] = {}
    for s in specs:
        per_comp[s.component] = per_comp.get(s.component, 0) + 1
    return {
        "mode": "model", "model": arch.name, "targets": targets, "components": list(components),
        "layers": len(specs), "layers_by_component": per_comp, "full_params": sum(full_params(s) for s in shapes),
        "model_params": {"trainable": trainable, "frozen": frozen},
        "precisions": PRECISIONS,
        "rows": model_rows(shapes, ranks, trainable, frozen),
    }


def file_report(adapter, path: str, ranks: Sequence[int]) -> dict[str, object]:
    """An adapter as it is, per component and in total; with ``ranks``, its layers at each of them."""
    result: dict[str, object] = {"mode": "file", "path": path, "format": adapter.source_format or None,
                                 "base_model": adapter.base_model, **adapter_ratio(adapter)}
    if ranks:
        shapes = [m.weight_shape for m in adapter.modules.values() if m.kind != "norm"]
        result["rows"] = [r.as_dict() for r in shapes_table(shapes, ranks)]
    return result
