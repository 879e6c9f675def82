"""peft's alpha bookkeeping: ``r``/``lora_alpha``/``rank_pattern``/``alpha_pattern``/``use_rslora``.

peft keeps alpha out of the tensors, in ``adapter_config.json`` (native folders) or in the
``lora_adapter_metadata`` safetensors entry (diffusers pipeline files, keys prefixed by component).
A pattern applies to a module when ``re.match(rf"(.*\\.)?({pattern})$", module_path)`` succeeds,
first pattern first (peft's own rule), so reading and writing agree with peft — evaluated by a linear-time
engine (:mod:`loratool.formats.peftpattern`), since the patterns come from files. Values are checked:
ranks are positive integers, alphas finite numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loratool.arch import naming
from loratool.errors import LoraToolError
from loratool.formats.peftpattern import PatternError, compile_peft_pattern
from loratool.io.jsontext import JsonLimit, NonFinite, parse_json

if TYPE_CHECKING:
    from loratool.core.modules import LoraModule, Module

METADATA_KEY = "lora_adapter_metadata"


MAX_RANK = 1 << 20


def pattern_key(patterns: Mapping[str, object], path: str) -> str | None:
    """The first pattern that applies to ``path`` (patterns were checked when the config was read)."""
    for pattern in patterns:
        if compile_peft_pattern(pattern).matches(path):
            return pattern
    return None


@dataclass
class PeftConfig:
    r: int = 8
    lora_alpha: float = 8.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def alpha_for(self, path: str) -> float:
        key = pattern_key(self.alpha_pattern, path)
        if key is not None:
            return float(self.alpha_pattern[key])
        return float(self.lora_alpha)


@dataclass
class AlphaSource:
    """peft configs per component ("" = every component)."""

    configs: dict[str, PeftConfig]

    def apply(self, module: LoraModule) -> None:
        cfg = self.configs.get(module.component) or self.configs.get("")
        if cfg is None:
            return
        module.alpha = cfg.alpha_for(module.path)
        module.rslora = bool(cfg.use_rslora)


def _rank(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not 1 <= value <= MAX_RANK:
        raise ValueError(f"{what} is {value!r}, not a rank (a whole number from 1 to {MAX_RANK})")
    return int(value)


def _alpha(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    return float(value)


def _patterns(value: object, what: str, convert) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} is a {type(value).__name__}, not an object of patterns")
    out = {}
    for key, v in value.items():
        try:
            compile_peft_pattern(str(key))
        except PatternError as e:
            raise ValueError(f"{what} key {str(key)!r} is not a pattern loratool evaluates ({e})") from None
        out[str(key)] = convert(v, f"{what}[{str(key)!r}]")
    return out


def _config(d: Mapping[str, object], where: str) -> PeftConfig:
    try:
        return PeftConfig(
            # a key left out takes LoraConfig's default (r=8, lora_alpha=8), as peft and diffusers do
            r=_rank(d.get("r", 8), "r"),
            lora_alpha=_alpha(d.get("lora_alpha", 8), "lora_alpha"),
            rank_pattern=_patterns(d.get("rank_pattern"), "rank_pattern", _rank),
            alpha_pattern=_patterns(d.get("alpha_pattern"), "alpha_pattern", _alpha),
            use_rslora=bool(d.get("use_rslora", False)),
        )
    except (TypeError, ValueError, OverflowError) as e:
        raise LoraToolError(f"peft config: {e}", where) from None


def alpha_source_from_config(config: Mapping[str, object], where: str) -> AlphaSource:
    raw = config.get("peft_type", "LORA")
    peft_type = str(getattr(raw, "value", raw)).upper()  # a PeftType enum from LoraConfig.to_dict(), or text
    if peft_type != "LORA":
        raise LoraToolError(f"peft adapter type {peft_type} is not supported (only LORA)", where)
    return AlphaSource({"": _config(config, where)})


def alpha_source_from_metadata(metadata: Mapping[str, str], where: str) -> AlphaSource | None:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        data = parse_json(raw)
    except (JsonLimit, NonFinite) as e:
        raise LoraToolError(f"{METADATA_KEY} metadata cannot be used: {e}", where) from None
    except ValueError:
        raise LoraToolError(f"{METADATA_KEY} metadata is not valid JSON", where) from None
    if not isinstance(data, dict):
        raise LoraToolError(f"{METADATA_KEY} metadata is not a JSON object", where)
    per: dict[str, dict] = {}
    for key, value in data.items():
        comp, dot, name = key.partition(".")
        if dot and name in PeftConfig.__dataclass_fields__ or (dot and name in ("target_modules", "use_dora")):
            per.setdefault(comp, {})[name] = value
        else:
            per.setdefault("", {})[key] = value
    return AlphaSource({comp: _config(d, where) for comp, d in per.items()})


def pattern_path(module: Module) -> str:
    """A module's path as written in patterns: CLIP paths without their wrapper (matches both spellings)."""
    return naming.without_clip_wrapper(module.path) if module.component.startswith("text_encoder") else module.path


def peft_alpha(module: LoraModule, rslora: bool) -> float:
    """The ``lora_alpha`` that gives this module its scale under peft (rsLoRA or not)."""
    if module.alpha is None:
        return float(module.rank) if not rslora else math.sqrt(module.rank)
    if module.rslora == rslora:
        return float(module.alpha)
    if module.rslora:  # plain peft: alpha/r must equal alpha_rs/sqrt(r)
        return float(module.alpha) * math.sqrt(module.rank)
    return float(module.alpha) / math.sqrt(module.rank)


def _most_common(counts: Counter):
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


def _anchored(path: str, paths: Mapping[str, object]) -> str:
    """A module's pattern: its path, with ``^`` when it would also match another module whose path ends with it
    (peft matches ``(.*\\.)?(pattern)$``: Flux's top-level ``proj_out`` would set every single block's
    ``proj_out`` too)."""
    return f"^{path}" if any(p.endswith("." + path) for p in paths) else path


def build_config(modules: list[LoraModule]) -> dict[str, object]:
    """``r``, ``lora_alpha``, patterns and ``target_modules`` that reproduce every module's scale."""
    rslora = bool(modules) and all(m.rslora for m in modules)
    ranks = {pattern_path(m): m.rank for m in modules}
    alphas = {pattern_path(m): peft_alpha(m, rslora) for m in modules}
    r = _most_common(Counter(ranks.values())) if ranks else 8
    alpha = _most_common(Counter(alphas.values())) if alphas else float(r)
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {_anchored(p, ranks): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {_anchored(p, alphas): v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "use_rslora": rslora,
        "use_dora": any(m.dora is not None for m in modules),
        "lora_bias": any(m.bias is not None for m in modules),
    }
