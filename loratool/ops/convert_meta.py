"""The metadata a converted file carries.

* The source's training record (``ss_*``) is carried over as it is, except the keys that describe
  the network, which are set again for what is written: ``ss_network_module`` (kohya targets:
  ``networks.lora``, ``networks.lora_flux`` or ``lycoris.kohya``), ``ss_network_dim``/``alpha``
  (``Dynamic`` when modules differ), ``ss_v2``/``ss_base_model_version``.
* ``modelspec.*`` is written for the target (title and date kept from the source when it had them).
  Both groups are built by ``formats.write.network_metadata``/``modelspec_metadata``, which
  ``write_adapter`` uses too; this module only chooses the values (dims, module, args, title).
* ``loratool.*`` records the conversion: the command, its parameters and a summary of what was done.
* ``sshs_*`` hashes are never carried: they are recomputed on the tensors as written
  (``finalize_metadata`` at write time).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from loratool.core.modules import Adapter
from loratool.formats.kohya import network_module
from loratool.formats.write import modelspec_metadata, network_metadata
from loratool.io.jsontext import parse_json
from loratool.io.metadata import BASE_MODELS, loratool_keys, skipped_metadata
from loratool.ops.convert import ConvertReport
from loratool.ops.convert_targets import resolve_target

_NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_v2", "ss_base_model_version")


def _uniform(values: list[Any]) -> Any:
    """The one value all modules share, or ``"Dynamic"`` (kohya's word for mixed dims)."""
    distinct = set(values)
    return values[0] if len(distinct) == 1 else "Dynamic"


def network_dims(adapter: Adapter) -> tuple[int | str, float | str | None]:
    """``ss_network_dim`` and ``ss_network_alpha`` describing the modules (rank/alpha when shared)."""
    ranks = [m.rank for m in adapter.modules.values() if isinstance(m.rank, int)]
    if not ranks:
        return "Dynamic", "Dynamic"
    dim = _uniform(ranks)
    alphas = [m.alpha if m.alpha is not None else float(m.rank) for m in adapter.modules.values()
              if isinstance(m.rank, int)]
    alpha = _uniform([float(a) for a in alphas])
    return dim, alpha


def conversion_summary(report: ConvertReport) -> dict[str, Any]:
    out: dict[str, Any] = {"from": report.source_format, "to": report.target, "exact": report.exact,
                           "modules": report.counts()}
    if report.lossy:
        out["max_rel_error"] = report.max_rel_error
    if report.dropped:
        out["dropped"] = [k for k, _ in report.dropped]
    if report.embeddings:
        out["embeddings_written_beside"] = report.embeddings
    return out


def target_metadata(source: Mapping[str, str], result: Adapter, report: ConvertReport, *,
                    parameters: Mapping[str, Any] | None = None, title: str | None = None) -> dict[str, str]:
    """Every metadata key of the converted file but the hashes (see the module docstring)."""
    spec = resolve_target(report.target)
    meta = {k: v for k, v in source.items() if k.startswith("ss_") and k not in _NETWORK_KEYS}
    dim, alpha = network_dims(result)
    base = result.base_model
    v_pred = source.get("ss_base_model_version", "").endswith("_v")
    module = network_module(result) if spec.kohya_metadata else None
    args = _network_args(source) if base in BASE_MODELS else None
    meta.update(network_metadata(base, dim, alpha, module=module, args=args, v_prediction=v_pred))
    name = title or source.get("modelspec.title") or source.get("ss_output_name") or "converted"
    meta.update(modelspec_metadata(base, name, source.get("modelspec.date"), v_prediction=v_pred))
    meta.update(loratool_keys("convert", parameters))
    meta.update(skipped_metadata(report.dropped))  # the file says it is not the whole of its input
    meta["loratool.convert"] = json.dumps(conversion_summary(report), sort_keys=True)
    return meta


def _network_args(source: Mapping[str, str]) -> str | None:
    """The source's ``ss_network_args``: a JSON object re-spelt with string values as kohya writes them,
    other text kept as it is, None when absent."""
    raw = source.get("ss_network_args")
    if _is_json_object(raw):
        return json.dumps({str(k): str(v) for k, v in parse_json(raw).items()})  # type: ignore[arg-type]
    return raw


def _is_json_object(text: str | None) -> bool:
    if not text:
        return False
    try:
        return isinstance(parse_json(text), dict)
    except ValueError:
        return False
