"""Retargeting: an adapter made for one model applied to a sibling that lacks some of its layers, with every
module the sibling has no place for dropped and named (never silently).

The retargetings are data in the family entries (``retarget``; ``arch.retargets()``): ``wan-t2v`` keeps a Wan
image-to-video LoRA's modules that a text-to-video Wan has (2.1 T2V, every 2.2 model: no ``k_img``/``v_img``,
no image embedder); ``chroma`` keeps a Flux LoRA's modules that Chroma has (no modulation layers, no
time/guidance/vector embedders). ComfyUI would log each dropped key as "lora key not loaded"; diffusers would
refuse the file.
"""

from __future__ import annotations

from loratool.arch import canonical_family, family, family_for, retargets
from loratool.core.modules import Adapter
from loratool.errors import LoraToolError


def retarget(adapter: Adapter, name: str) -> tuple[Adapter, list[tuple[str, str]]]:
    """The adapter without the modules ``name``'s target model lacks, and (module key, why) for each dropped."""
    found = retargets().get(name.strip().lower())
    if found is None:
        raise LoraToolError(f"unknown retargeting {name!r} (use one of: {', '.join(sorted(retargets()))})")
    source_name, spec = found
    own = canonical_family(adapter.base_model)
    if own != source_name and (own is None or family(own).variant_of != source_name):  # Kontext is Flux's too
        raise LoraToolError(f"{name} retargets {family(source_name).label} adapters; this one is for "
                            f"{adapter.base_model}")
    source = family_for(adapter)
    target = family(spec.get("family", source_name))
    if target.name == source_name:
        target = source.at({**source.sizes, **spec.get("sizes", {})})
    else:
        target = target.sized({key: tuple(m.weight_shape) for key, m in adapter.modules.items()})
    out = Adapter(metadata=dict(adapter.metadata), base_model=target.name, source_format=adapter.source_format,
                  embeddings=dict(adapter.embeddings), unknown=list(adapter.unknown),
                  unknown_reasons=dict(adapter.unknown_reasons))
    dropped = []
    for key, module in adapter.modules.items():
        if key in target.modules:
            out.add(module)
        elif module.component not in target.components:
            dropped.append((key, f"{target.label} has no {module.component}"))
        else:
            dropped.append((key, spec.get("why", f"{target.label} has no such layer")))
    if not out.modules:
        raise LoraToolError(f"every module of this adapter is one {target.label} lacks: nothing is left for {name}")
    return out, dropped
