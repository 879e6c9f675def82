"""Standard adapter metadata: building the keys web UIs read, finalising it before a write, and
reading kohya's training metadata back for display (reference/kohya.md §5).

Every value in a safetensors header is a string; builders here return ``dict[str, str]``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratool.errors import LoraToolError
from loratool.io.hashes import tensor_hashes
from loratool.io.jsontext import parse_json
from loratool.io.writer import check_metadata

if TYPE_CHECKING:
    import torch

SAI_MODEL_SPEC_VERSION = "1.0.1"
IMPL_DIFFUSERS = "diffusers"
IMPL_SGM = "https://github.com/Stability-AI/generative-models"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"
# kohya writes no SD3 LoRA implementation we could cite; SD3's reference code is Stability's
IMPL_SD3 = "https://github.com/Stability-AI/sd3.5"


@dataclass(frozen=True)
class BaseSpec:
    """What the standard keys say about one base model family."""

    ss_version: str  # ss_base_model_version
    v2: bool  # ss_v2
    network_module: str  # kohya's module name for a LoRA of this model
    architecture: str  # modelspec.architecture, without /lora
    implementation: str
    resolution: str
    prediction_type: str | None  # None: the key is left out (Flux)


BASE_MODELS: dict[str, BaseSpec] = {
    "sd1": BaseSpec("sd_v1", False, "networks.lora", "stable-diffusion-v1", IMPL_DIFFUSERS, "512x512", "epsilon"),
    "sd2": BaseSpec("sd_v2", True, "networks.lora", "stable-diffusion-v2-512", IMPL_DIFFUSERS, "512x512",
                    "epsilon"),
    "sdxl": BaseSpec("sdxl_base_v1-0", False, "networks.lora", "stable-diffusion-xl-v1-base", IMPL_SGM,
                     "1024x1024", "epsilon"),
    "flux": BaseSpec("flux1", False, "networks.lora_flux", "flux-1-dev", IMPL_FLUX, "1024x1024", None),
    # kohya's SD3 LoRA module; ss_base_model_version for SD3 is not documented in our references
    "sd3": BaseSpec("sd3", False, "networks.lora_sd3", "stable-diffusion-3-medium", IMPL_SD3, "1024x1024",
                    "epsilon"),
}


def base_spec(base_model: str) -> BaseSpec:
    try:
        return BASE_MODELS[base_model]
    except KeyError:
        known = ", ".join(BASE_MODELS)
        raise LoraToolError(f"unknown base model {base_model!r} (known: {known})") from None


def _num(x: float | int | str) -> str:
    """kohya's spelling: alpha as a float (``"8.0"``), a string ("Dynamic") passed through."""
    return x if isinstance(x, str) else repr(float(x))


def ss_minimal(base_model: str, dim: int | str, alpha: float | str | None, *,
               network_module: str | None = None, network_args: Mapping[str, object] | None = None,
               v_prediction: bool = False) -> dict[str, str]:
    """The six ``ss_*`` keys every kohya-reading tool expects.

    ``alpha=None`` (no alpha stored, scale 1) is written as alpha = dim, which means the same.
    ``dim``/``alpha`` may be the string ``"Dynamic"`` when modules differ.
    """
    spec = base_spec(base_model)
    version = spec.ss_version
    if v_prediction and base_model in ("sd1", "sd2"):
        version += "_v"
    if alpha is None:
        alpha = dim if isinstance(dim, str) else float(dim)
    args = {str(k): str(v) for k, v in (network_args or {}).items()}
    return {
        "ss_v2": str(spec.v2),
        "ss_base_model_version": version,
        "ss_network_module": network_module or spec.network_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(args),
    }


def iso_date(when: _dt.datetime | None = None) -> str:
    """ISO-8601 without timezone or microseconds. With no argument: ``SOURCE_DATE_EPOCH`` when set
    (reproducible builds), else now (local time, as kohya writes it)."""
    if when is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        if epoch is not None and epoch.strip().isdigit():
            when = _dt.datetime.fromtimestamp(int(epoch), tz=_dt.timezone.utc).replace(tzinfo=None)
        else:
            when = _dt.datetime.now()
    return when.replace(microsecond=0, tzinfo=None).isoformat()


def modelspec(base_model: str, title: str, *, lora: bool = True, resolution: str | None = None,
              date: str | None = None, v_prediction: bool = False,
              architecture: str | None = None) -> dict[str, str]:
    """The ``modelspec.*`` keys (SAI model spec 1.0.1) for an adapter of ``base_model``."""
    spec = base_spec(base_model)
    arch = architecture or spec.architecture
    res = resolution or spec.resolution
    prediction = spec.prediction_type
    if v_prediction and prediction is not None:
        prediction = "v"
        if base_model == "sd2" and architecture is None:
            arch, res = "stable-diffusion-v2-768-v", resolution or "768x768"
    out = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": f"{arch}/lora" if lora else arch,
        "modelspec.implementation": spec.implementation,
        "modelspec.title": title,
        "modelspec.resolution": res,
        "modelspec.date": date or iso_date(),
    }
    if prediction is not None:
        out["modelspec.prediction_type"] = prediction
    return out


def loratool_keys(command: str, parameters: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Our own keys: which loratool made the file, with which command and parameters (JSON)."""
    from loratool import __version__

    params = json.dumps(dict(parameters or {}), sort_keys=True, default=str)
    return {"loratool.version": __version__, "loratool.command": command, "loratool.parameters": params}


SKIPPED_KEY = "loratool.skipped"


def skipped_metadata(skipped: list[tuple[str, str]]) -> dict[str, str]:
    """``loratool.skipped``: the modules an output was written without (a flag allowed it), each with why,
    so that the file itself says it is not the whole of its input. Empty when nothing was skipped."""
    if not skipped:
        return {}
    return {SKIPPED_KEY: json.dumps([{"module": k, "why": w} for k, w in skipped], ensure_ascii=False)}


def finalize_metadata(tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Metadata ready to write with ``tensors`` (exactly as they will be written, after any cast):
    every value a string, stale ``sshs_*`` values replaced by the right ones."""
    meta = {k: v for k, v in (check_metadata(metadata) or {}).items() if not k.startswith("sshs_")}
    meta.update(tensor_hashes(tensors, meta))
    return dict(sorted(meta.items()))


# -- reading kohya metadata for display ------------------------------------------------------

JSON_KEYS = ("ss_tag_frequency", "ss_network_args", "ss_datasets", "ss_dataset_dirs", "ss_reg_dataset_dirs",
             "ss_bucket_info")
MAX_JSON_CHARS = 50_000_000


def decode_json(value: str | None) -> Any:
    """A JSON-valued metadata string decoded, or None when it is absent, "None" or not valid JSON.

    Only plain JSON parsing (no eval); absurdly deep or long values give None, never an exception;
    ``NaN``/``Infinity`` parse (as floats) for display, and the readers below skip them.
    """
    if value is None or len(value) > MAX_JSON_CHARS:
        return None
    text = value.strip()
    if not text or text == "None":
        return None
    try:
        return parse_json(text, allow_non_finite=True)
    except ValueError:
        return None


def _epoch_to_iso(value: str | None) -> str | None:
    """kohya's ``ss_training_*_at`` (epoch seconds as a float string) as ISO-8601 UTC."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
        return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc).replace(microsecond=0).isoformat()
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def tag_counts(metadata: Mapping[str, str]) -> dict[str, int]:
    """Tag -> count summed over every dataset folder in ``ss_tag_frequency`` (or, when that is
    missing, the ``tag_frequency`` of each entry of ``ss_datasets``)."""
    per_dir = decode_json(metadata.get("ss_tag_frequency"))
    folders: list[Any] = []
    if isinstance(per_dir, dict):
        folders = list(per_dir.values())
    else:
        datasets = decode_json(metadata.get("ss_datasets"))
        if isinstance(datasets, list):
            for ds in datasets:
                tf = ds.get("tag_frequency") if isinstance(ds, dict) else None
                if isinstance(tf, dict):
                    folders.extend(tf.values())
    counts: dict[str, int] = {}
    for folder in folders:
        if not isinstance(folder, dict):
            continue
        for tag, n in folder.items():
            if isinstance(n, (int, float)) and not isinstance(n, bool) \
                    and (isinstance(n, int) or math.isfinite(n)):
                key = str(tag).strip()
                counts[key] = counts.get(key, 0) + int(n)
    return counts


def top_tags(metadata: Mapping[str, str], n: int = 10) -> list[tuple[str, int]]:
    """The ``n`` most frequent training tags, most frequent first (ties by name)."""
    return sorted(tag_counts(metadata).items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _plain(value: str | None) -> str | None:
    return None if value is None or value == "None" else value


def describe_metadata(metadata: Mapping[str, str], top: int = 10) -> dict[str, Any]:
    """A readable summary of a file's kohya/modelspec metadata (JSON-serialisable)."""
    started = _epoch_to_iso(metadata.get("ss_training_started_at"))
    finished = _epoch_to_iso(metadata.get("ss_training_finished_at"))
    args = decode_json(metadata.get("ss_network_args"))
    network = {
        "module": _plain(metadata.get("ss_network_module")),
        "dim": _plain(metadata.get("ss_network_dim")),
        "alpha": _plain(metadata.get("ss_network_alpha")),
        "args": args if isinstance(args, dict) else _plain(metadata.get("ss_network_args")),
    }
    training = {
        "started_at": started,
        "finished_at": finished,
        "output_name": _plain(metadata.get("ss_output_name")),
        "base_model_name": _plain(metadata.get("ss_sd_model_name")),
        "steps": _plain(metadata.get("ss_steps") or metadata.get("ss_max_train_steps")),
        "epochs": _plain(metadata.get("ss_epoch") or metadata.get("ss_num_epochs")),
        "learning_rate": _plain(metadata.get("ss_learning_rate")),
        "comment": _plain(metadata.get("ss_training_comment")),
    }
    return {
        "base_model_version": _plain(metadata.get("ss_base_model_version")),
        "v2": _plain(metadata.get("ss_v2")),
        "network": {k: v for k, v in network.items() if v is not None},
        "training": {k: v for k, v in training.items() if v is not None},
        "top_tags": top_tags(metadata, top),
        "modelspec": {k.removeprefix("modelspec."): v for k, v in sorted(metadata.items())
                      if k.startswith("modelspec.")},
        "loratool": {k.removeprefix("loratool."): v for k, v in sorted(metadata.items())
                     if k.startswith("loratool.")},
        "hashes": {k: v for k, v in sorted(metadata.items()) if k.startswith("sshs_")},
    }
