"""Loading an SD1.x / SD2.x / SDXL single-file checkpoint for training, offline.

The architecture is read from the file's keys and shapes (loratool.arch), every tensor is mapped to
diffusers naming with the architecture tables (loratool.arch.convert: fused OpenCLIP in_proj rows split,
VAE 1x1 attention convs squeezed, text_projection transposed), and the models are built on the meta device
from the configs shipped in loratool/train/configs/<arch>.json, then filled strictly: a model tensor that
the file does not provide, or a file tensor that belongs to no model tensor, is an error naming it.

The file holds no tokenizer, and none may be fetched: the CLIP tokenizer comes from ``tokenizer_dir``
(a tokenizer folder, or a diffusers pipeline folder with tokenizer/ and, for SDXL, tokenizer_2/), else it
is built from the CLIP BPE merges list in the installed open_clip_torch package (MIT; found, not imported).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

import torch

from loratool.errors import LoraToolError

ARCHS = ("sd1", "sd2", "sdxl")
TE_NAMES = {"sd1": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}


def shipped_configs(arch: str) -> dict:
    """{unet, vae, text_encoder[, text_encoder_2], scheduler} config dicts of one architecture."""
    text = resources.files("loratool.train").joinpath("configs", f"{arch}.json").read_text()
    return json.loads(text)


def load_configs(arch: str, config_dir: str | Path | None) -> dict:
    """Our configs, each replaced by the one in ``config_dir`` (a diffusers folder) where it has one."""
    configs = shipped_configs(arch)
    if config_dir is None:
        return configs
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        raise LoraToolError("--config is not a folder", config_dir)
    for name in configs:
        file = config_dir / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if file.is_file():
            try:
                configs[name] = json.loads(file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise LoraToolError(f"cannot read the config ({e})", file) from None
    return configs


def build_models(arch: str, configs: dict) -> dict[str, torch.nn.Module]:
    """Empty (meta device) models of one architecture: unet, vae, text_encoder[, text_encoder_2]."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                  "vae": AutoencoderKL.from_config(configs["vae"])}
        for name in TE_NAMES[arch]:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            cfg = CLIPTextConfig(**{k: v for k, v in configs[name].items() if not k.startswith("_")})
            models[name] = cls(cfg)
    return models


def _model_name(name: str, wanted: set[str]) -> str:
    """A table name as the model's state dict spells it (the registry's CLIP rule)."""
    from loratool.arch.naming import state_dict_name

    return state_dict_name(name, wanted)


def map_checkpoint(arch: str, keys: Iterable[str], get: Callable[[str], torch.Tensor],
                   path: Path | None = None, table_shapes: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {diffusers param: tensor}} from single-file keys; unknown keys are an error.

    table_shapes=False: the widths come from a config, not the table (fill_models checks them)."""
    from loratool.arch import load_arch
    from loratool.arch.convert import checkpoint_to_diffusers

    table = load_arch(arch)
    out: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key in keys:
        if key not in table.checkpoint_params:
            if not table.is_checkpoint_extra(key):
                unknown.append(key)
            continue
        try:
            pairs = checkpoint_to_diffusers(table, key, get(key), table_shapes)
        except LoraToolError as e:
            if e.path is not None:
                raise
            hint = " (a model of other widths needs --config DIR, a diffusers folder of its configs)" \
                if table_shapes else ""
            raise LoraToolError(e.message + hint, path) from None
        for spec, tensor in pairs:
            out.setdefault(spec.component, {})[spec.name] = tensor
    if unknown:
        raise LoraToolError(f"{len(unknown)} tensor(s) of no {arch} model: {', '.join(sorted(unknown)[:5])}", path)
    return out


def fill_models(models: dict[str, torch.nn.Module], tensors: dict[str, dict[str, torch.Tensor]],
                path: Path | None = None, dtype: torch.dtype | None = torch.float32) -> None:
    """Load every model strictly from ``tensors`` (assign: meta models take the tensors as they are)."""
    for comp, model in models.items():
        wanted = dict(model.state_dict())
        given = {_model_name(k, set(wanted)): v for k, v in tensors.get(comp, {}).items()}
        missing = sorted(set(wanted) - set(given))
        extra = sorted(set(given) - set(wanted))
        if missing or extra:
            what = [f"{comp} lacks {', '.join(missing[:5])}" if missing else "",
                    f"{comp} has no {', '.join(extra[:5])}" if extra else ""]
            raise LoraToolError(f"checkpoint does not fit the {comp} config: {'; '.join(w for w in what if w)}",
                                path)
        for name, tensor in given.items():
            if tuple(tensor.shape) != tuple(wanted[name].shape):
                raise LoraToolError(f"{comp}.{name} has shape {list(tensor.shape)}, the config expects "
                                    f"{list(wanted[name].shape)}", path)
            if dtype is not None and not tensor.is_meta:
                given[name] = tensor.to(dtype=dtype, copy=True).contiguous()
        model.load_state_dict(given, strict=True, assign=True)
        _fill_position_ids(model)


def _fill_position_ids(model: torch.nn.Module) -> None:
    """CLIP's position_ids is a non-persistent buffer: not in any file, so it is rebuilt here."""
    for mod_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise LoraToolError(f"internal: buffer {mod_name}.{name} was not filled")
            device = next(model.parameters()).device
            module.register_buffer(name, torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone(),
                                   persistent=False)


def load_tokenizers(arch: str, tokenizer_dir: str | Path | None, path: Path) -> list:
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        bpe = open_clip_bpe_file()
        if bpe is None:
            raise LoraToolError("a single-file checkpoint holds no tokenizer: give --tokenizer DIR (a CLIP "
                                "tokenizer folder, or a diffusers pipeline folder with tokenizer/), or install "
                                "open_clip_torch (its CLIP BPE list is used)", path)
        first = clip_tokenizer_from_bpe(bpe, "!" if arch == "sd2" else "<|endoftext|>")  # as SD2 and SDXL ship
        return [first] + ([clip_tokenizer_from_bpe(bpe, "!")] if arch == "sdxl" else [])
    tdir = Path(tokenizer_dir)
    if not tdir.is_dir():
        raise LoraToolError("--tokenizer is not a folder", tdir)
    first = tdir / "tokenizer" if (tdir / "tokenizer").is_dir() else tdir
    second = tdir / "tokenizer_2" if (tdir / "tokenizer_2").is_dir() else None
    try:
        toks = [AutoTokenizer.from_pretrained(first)]
        if arch == "sdxl":  # SDXL's second tokenizer is the same BPE, padding with "!"
            toks.append(AutoTokenizer.from_pretrained(second) if second else
                        AutoTokenizer.from_pretrained(first, pad_token="!"))
    except (OSError, ValueError, TypeError) as e:
        raise LoraToolError(f"cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                            tdir) from None
    return toks


def checkpoint_arch(path: Path) -> str:
    """sd1 | sd2 | sdxl from a single file's keys and shapes (anything else is an error).

    Widths of no known model (the cross-attention width decides) fall back to the key names: a file whose
    keys are all of one table's layout is of that layout (loratool.arch.detect.detect_layout_from_checkpoint),
    and its widths must then fit the configs (``--config``), which fill_models checks tensor by tensor."""
    from loratool.arch import detect_arch_from_checkpoint
    from loratool.arch.detect import detect_layout_from_checkpoint
    from loratool.io.safetensors import SafetensorsFile

    if path.suffix.lower() != ".safetensors":
        raise LoraToolError("single-file checkpoints must be .safetensors (pickled .ckpt files are not loaded)",
                            path)
    file = SafetensorsFile(path)
    arch = detect_arch_from_checkpoint((k, file.info(k).shape) for k in file.keys())
    if arch == "unknown":
        arch = detect_layout_from_checkpoint(file.keys())
    if arch not in ARCHS:
        raise LoraToolError(f"not an SD1.x/SD2.x/SDXL checkpoint (detected: {arch})", path)
    return arch


def load_single_file(path: Path, arch: str, config_dir: str | Path | None = None) -> tuple[dict, dict]:
    """({component: model on CPU, fp32}, configs) from a .safetensors single-file checkpoint of ``arch``.

    With ``config_dir`` the configs decide the widths (the table's shapes are not required of the file)."""
    from loratool.io.safetensors import SafetensorsFile

    file = SafetensorsFile(path)
    configs = load_configs(arch, config_dir)
    models = build_models(arch, configs)
    fill_models(models, map_checkpoint(arch, file.keys(), file.get, path, table_shapes=config_dir is None), path)
    return models, configs


def _byte_alphabet() -> list[str]:
    """The 256 characters of byte-level BPE in vocabulary order: the printable bytes (standing for
    themselves) first, in byte order, then the other bytes, which take the code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    rest = [b for b in range(256) if b not in set(keep)]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def open_clip_bpe_file() -> Path | None:
    """open_clip_torch's CLIP BPE merges list (MIT), when that package is installed; not imported."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return file if file.is_file() else None


def clip_tokenizer_from_bpe(bpe_gz: Path, pad_token: str = "<|endoftext|>"):
    """The CLIP tokenizer (49408 tokens) from the gzipped BPE merges list: vocab = the byte alphabet, the same
    with ``</w>``, the first 48894 merges joined, then the two special tokens."""
    import gzip
    import tempfile

    from transformers import CLIPTokenizer

    from loratool.io.output import Outputs

    merges = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:  # scratch files, written like every other file (io.output)
        scratch = Outputs()
        vocab = scratch.write_json(Path(tmp) / "vocab.json", {t: i for i, t in enumerate(tokens)})
        merge_file = scratch.write_bytes(Path(tmp) / "merges.txt",
                                         ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
        return CLIPTokenizer(str(vocab), str(merge_file), pad_token=pad_token, model_max_length=77)
