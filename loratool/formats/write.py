"""``encode(adapter, fmt)`` -> (tensors, metadata) and ``write_adapter``: canonical form to a layout.

Layouts and their aliases: ``formats.layouts`` (peft is written as a folder; one sub-folder per component
when several). Each layout's codec encodes; this module adds the metadata. Metadata: the source's ``ss_*`` training keys are kept, ``ss_network_*`` and ``modelspec.*`` are set for
the target, and ``sshs_model_hash``/``sshs_legacy_hash`` are computed from the tensors as written.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loratool.core.modules import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.formats import diffusers as diffusers_codec
from loratool.formats import kohya as kohya_codec
from loratool.formats.layouts import FORMATS, writable_layout

if TYPE_CHECKING:
    from loratool.io.output import Outputs

__all__ = ["FORMATS", "canonical_format", "encode", "modelspec_metadata", "network_metadata", "peft_config",
           "target_metadata", "write_adapter"]
# keys the target's own metadata replaces
_REPLACED = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
             "ss_v2", "sshs_", "lora_adapter_metadata", "format")


def canonical_format(fmt: str) -> str:
    """The layout name of a ``--to`` value (aliases included); unknown and read-only layouts are errors."""
    return writable_layout(fmt).name


def _dim_alpha(modules: list) -> tuple[int, float]:
    ranks = Counter(m.rank for m in modules if getattr(m, "rank", None))
    alphas = Counter(kohya_codec.kohya_alpha(m) if m.alpha is not None else float(m.rank or 1) for m in modules)
    dim = most_common(ranks) if ranks else 1
    return dim, most_common(alphas) if alphas else float(dim)


def _is_kxk(m) -> bool:
    return len(m.weight_shape) == 4 and tuple(m.weight_shape[2:]) != (1, 1)


def _kohya_meta(adapter: Adapter) -> dict[str, str]:
    """kohya's network keys: dim/alpha of the linear (and 1x1) modules, conv_dim/conv_alpha of the kxk convs."""
    mods = list(adapter.modules.values())
    kxk = [isinstance(m, LoraModule) and _is_kxk(m) for m in mods]
    conv = [m for m, k in zip(mods, kxk, strict=True) if k]
    dim, alpha = _dim_alpha([m for m, k in zip(mods, kxk, strict=True) if not k] or mods)
    module = kohya_codec.network_module(adapter)
    args = adapter.metadata.get("ss_network_args")
    if not args or adapter.metadata.get("ss_network_module") != module:  # the source's args describe its own kind
        extra = {}
        if conv:
            conv_dim, conv_alpha = _dim_alpha(conv)
            extra = {"conv_dim": str(conv_dim), "conv_alpha": repr(float(conv_alpha))}
        args = json.dumps(extra)
    return network_metadata(adapter.base_model, dim, alpha, module=module, args=args)


def network_metadata(base_model: str, dim: int | str, alpha: float | str, *, module: str | None,
                     args: str | None = None, v_prediction: bool = False) -> dict[str, str]:
    """The ``ss_network_*`` keys of an output file — the one place they are built (``convert`` calls it too).

    A known base model also gets ``ss_v2``/``ss_base_model_version`` (``ss_minimal``). ``module=None``
    leaves ``ss_network_module`` out (targets kohya-style loaders do not read); ``args`` is the
    ``ss_network_args`` text: None gives ``{}`` for a known base model and no key otherwise.
    """
    from loratool.io.metadata import BASE_MODELS, ss_minimal

    if base_model in BASE_MODELS:
        meta = ss_minimal(base_model, dim, alpha, network_module=module, v_prediction=v_prediction)
        if module is None:
            del meta["ss_network_module"]
    else:
        meta = {"ss_network_dim": str(dim), "ss_network_alpha": alpha if isinstance(alpha, str) else repr(float(alpha))}
        if module is not None:
            meta["ss_network_module"] = module
    if args is not None:
        meta["ss_network_args"] = args
    return meta


def modelspec_metadata(base_model: str, title: str, date: str | None, *, v_prediction: bool = False
                       ) -> dict[str, str]:
    """The ``modelspec.*`` keys of an output file — the one place they are built. None for an unknown
    base model; without a source date the date is left out, so that the same input gives the same bytes."""
    from loratool.io.metadata import BASE_MODELS, modelspec

    if base_model not in BASE_MODELS:
        return _family_modelspec(base_model, title, date)
    spec = modelspec(base_model, title, date=date or "1970-01-01T00:00:00", v_prediction=v_prediction)
    if not date:
        del spec["modelspec.date"]
    return spec


def _family_modelspec(base_model: str, title: str, date: str | None) -> dict[str, str]:
    """The ``modelspec.architecture`` a family's entry names (``modelspec``), so that a file says which family it
    is for where its keys cannot (a Flux Kontext LoRA is spelt as a Flux one); {} for a family without one."""
    from loratool.arch import canonical_family, family
    from loratool.io.metadata import SAI_MODEL_SPEC_VERSION

    name = canonical_family(base_model)
    architecture = family(name).entry.get("modelspec") if name else None
    if not architecture:
        return {}
    out = {"modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION, "modelspec.architecture": f"{architecture}/lora",
           "modelspec.title": title}
    if date:
        out["modelspec.date"] = date
    return out


def most_common(counts: Counter):
    """The most frequent value; ties go to the largest value (independent of module order)."""
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


def _modelspec(adapter: Adapter) -> dict[str, str]:
    src = adapter.metadata
    title = src.get("modelspec.title") or src.get("ss_output_name") or "LoRA"
    return modelspec_metadata(adapter.base_model, title, src.get("modelspec.date"))


def target_metadata(adapter: Adapter, fmt: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata a file of ``fmt`` gets (without hashes): source keys kept, target keys set."""
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith(_REPLACED)}
    meta.update({k: v for k, v in adapter.metadata.items() if k.startswith("modelspec.")})
    meta.update(_modelspec(adapter))
    if writable_layout(fmt).kohya_metadata:
        meta.update(_kohya_meta(adapter))
    meta.update({str(k): str(v) for k, v in (extra or {}).items()})
    return meta


def _finalize(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> dict[str, str]:
    try:
        from loratool.io.metadata import finalize_metadata
    except ImportError:  # pragma: no cover - io.metadata ships with the package
        return dict(meta)
    return finalize_metadata(tensors, meta)


def encode(adapter: Adapter, fmt: str, metadata: Mapping[str, str] | None = None
           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``adapter`` in layout ``fmt`` (peft: one component only)."""
    tensors, meta = _encode(adapter, canonical_format(fmt), metadata)
    return tensors, _finalize(tensors, meta)


def _encode(adapter: Adapter, fmt: str, metadata: Mapping[str, str] | None
            ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``encode`` without the hashes (the writer computes them as it writes)."""
    from loratool.formats.read import require_complete

    require_complete(adapter)  # nothing of the input is dropped without a word
    layout = writable_layout(fmt)
    if not adapter.modules and not (adapter.embeddings and layout.name == "textual-inversion"):
        raise LoraToolError("the adapter has no modules to write")
    family = diffusers_codec.family_of(adapter)
    if layout.name not in family.layouts:
        raise LoraToolError(f"the {layout.name} layout has no place for a {family.name} adapter "
                            f"(it takes {', '.join(family.layouts)})")
    denoiser_only = layout.components is not None and layout.components <= {"unet", "transformer"}
    outside = sorted({m.component for m in adapter.modules.values() if not layout.holds_component(m.component)}
                     if denoiser_only else ())
    if outside:  # written as asked or refused: a text encoder or generic module never under a denoiser's name
        n = sum(not layout.holds_component(m.component) for m in adapter.modules.values())
        raise LoraToolError(f"the {layout.name} layout holds {', '.join(sorted(layout.components or ()))} modules "
                            f"only, not {', '.join(outside)} ({n} of {len(adapter.modules)} modules): --to kohya "
                            "or peft holds every component")
    tensors, own = layout.encoder_function()(adapter, family)
    meta = {} if layout.name == "textual-inversion" else target_metadata(adapter, layout.name, None)
    meta.update(own)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return tensors, meta


def peft_config(adapter: Adapter) -> dict[str, dict[str, object]]:
    """component -> adapter_config.json contents for a peft folder."""
    return {comp: cfg for comp, (_, cfg) in diffusers_codec.encode_peft(adapter).items()}


def write_adapter(adapter: Adapter, path: str | os.PathLike[str], fmt: str, *, force: bool = False,
                  inputs: Iterable[str | os.PathLike[str]] = (), metadata: Mapping[str, str] | None = None,
                  peft_clip_layout: str = "auto", outputs: Outputs | None = None,
                  peft_embeddings: Collection[str] = (), peft_config: Mapping[str, object] | None = None) -> Path:
    """Write ``adapter`` as ``fmt`` to ``path`` (a file, or a folder for peft) and return the path.

    The write goes through ``outputs`` (a command's :class:`~loratool.io.output.Outputs`, which may have
    claimed ``path`` already); without one, through a fresh one of ``inputs`` and ``force``.
    ``peft_clip_layout`` (peft only): how CLIP text-encoder keys are spelt — ``auto`` follows the installed
    transformers (``flat`` when it is not importable), see ``names.peft_text_encoder_path``;
    ``peft_embeddings`` (module keys written in peft's embedding layout) and ``peft_config`` (adapter_config
    fields such as ``task_type``) likewise."""
    from loratool.io.output import Outputs

    outputs = outputs if outputs is not None else Outputs(inputs, force=force)
    fmt = canonical_format(fmt)
    if fmt == "peft":
        return _write_peft(adapter, Path(path), force=force, inputs=[], metadata=metadata,
                           clip_layout=peft_clip_layout, outputs=outputs, embeddings=peft_embeddings,
                           config=peft_config)
    tensors, meta = _encode(adapter, fmt, metadata)
    return outputs.write_safetensors(path, tensors, meta, hashes=True)


def _write_peft(adapter: Adapter, folder: Path, *, force: bool, inputs: list, metadata,
                clip_layout: str = "auto", outputs: Outputs | None = None, embeddings: Collection[str] = (),
                config: Mapping[str, object] | None = None) -> Path:
    """A peft folder (one sub-folder per component when several), replacing an old one as a whole."""
    from loratool.formats.read import require_complete
    from loratool.io.output import Outputs

    outputs = outputs if outputs is not None else Outputs(inputs, force=force)
    require_complete(adapter)  # nothing of the input is dropped without a word
    if not adapter.modules:
        raise LoraToolError("the adapter has no modules to write")
    parts = diffusers_codec.encode_peft(adapter, clip_layout, embeddings, config)
    base_meta = target_metadata(adapter, "peft", metadata)
    with outputs.folder(folder) as out:
        for comp, (tensors, config) in parts.items():
            sub = "" if len(parts) == 1 else f"{comp}/"
            out.write_safetensors(f"{sub}adapter_model.safetensors", tensors, base_meta, hashes=True)
            out.write_json(f"{sub}adapter_config.json", config, indent=2, sort_keys=True)
    return folder


def lora_modules(adapter: Adapter) -> list[LoraModule]:
    return [m for m in adapter.modules.values() if isinstance(m, LoraModule)]
