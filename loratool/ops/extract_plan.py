"""What an extraction will do, decided before any tensor is read: the modules, their shapes, ranks.

Two ways to list modules:

* an architecture table (sd1, sd2, sdxl, flux, sd3): the ``--targets`` set of its modules, each
  found in the files as a single-file key (with or without the component prefix, e.g. bare BFL
  keys), a diffusers component key (``path.weight``) or a folder key (``component.path.weight``);
  fused weights (Flux/SD3 qkv) are read as kohya trains them, whole;
* ``generic``: every floating tensor of two or more dims present in both files, named as it is
  (an LLM folder: its input embedding is marked as one, and a head tied to it is left out, since
  it is the same weight — :mod:`loratool.ops.extract_llm`).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from loratool.errors import LoraToolError
from loratool.io.dtypes import FLOAT_NAMES
from loratool.io.sources import TensorSource, open_source
from loratool.io.weights import Segment, WeightRef, weight_pieces
from loratool.linalg.policy import RankMode, SvdPolicy
from loratool.ops.extract_llm import is_embedding, tied_head

TEXT_PREFIX = "text_encoder"
GENERIC = "model"  # the component of a generic pair's modules; their keys are the file's own names
DEFAULT_MIN_CHANGE = 2e-3  # relative Frobenius change; a bf16 round trip alone is ~1e-3


@dataclass(frozen=True)
class ExtractOptions:
    rank: int = 32
    conv_rank: int | None = None  # k×k convs; None: same as rank
    rank_mode: RankMode = field(default_factory=RankMode)
    targets: str = "transformer"  # loratool.arch.table.TARGET_SETS
    arch: str | None = None  # None: detect; "generic": keep names
    min_change: float = DEFAULT_MIN_CHANGE
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    policy: SvdPolicy = field(default_factory=SvdPolicy)
    clamp_quantile: float | None = None
    dtype: str | None = None  # fp16 | bf16 | fp32; None: the inputs'
    device: str = "cpu"
    deltas: frozenset[str] = frozenset()  # "bias" (.diff_b of the extracted layers), "norm" (.diff of norm weights)

    def __post_init__(self) -> None:
        from loratool.arch.table import target_set

        object.__setattr__(self, "targets", target_set(self.targets))  # an old spelling gets its name
        if self.rank < 1 or (self.conv_rank is not None and self.conv_rank < 1):
            raise LoraToolError("ranks must be at least 1")
        if not self.deltas <= {"bias", "norm"}:
            raise LoraToolError(f"deltas {sorted(self.deltas)}: use bias and/or norm")
        if self.clamp_quantile is not None and not 0 < self.clamp_quantile <= 1:
            raise LoraToolError(f"--clamp-quantile {self.clamp_quantile}: use a value in (0, 1]")


@dataclass(frozen=True)
class PlannedModule:
    component: str
    path: str
    shape: tuple[int, ...]  # the layer weight's shape
    ref: WeightRef
    rank: int  # the cap (the rank itself in fixed mode)
    embedding: bool = False  # an input embedding ([vocab, dim]), not a linear layer

    @property
    def key(self) -> str:
        """The module's name in reports and ``--include``: ``component.path``, or a generic pair's own
        name (``model.layers.0.mlp.up_proj``, not ``model.model.…``)."""
        return f"{self.component}.{self.path}" if self.component and self.component != GENERIC else self.path

    @property
    def adapter_key(self) -> str:
        """Its key in the canonical adapter (``component.path``)."""
        return f"{self.component}.{self.path}" if self.component else self.path

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def is_text_encoder(self) -> bool:
        return self.component.startswith(TEXT_PREFIX)

    def lora_params(self) -> int:
        m, n = self.matrix_shape
        return self.rank * (m + n)


@dataclass
class Plan:
    arch: str
    modules: list[PlannedModule]
    excluded: list[str]  # by --include/--exclude
    missing: list[str]  # targets of the table that neither file holds (e.g. no text encoder in a unet file)
    tied: dict[str, str] = field(default_factory=dict)  # head left out -> the embedding it is tied to
    config: dict | None = None  # TUNED's config.json (an HF model folder), for the output's peft config

    def output_bytes(self, bytes_per_value: int) -> int:
        return sum(m.lora_params() * bytes_per_value + 4 for m in self.modules)


@contextmanager
def open_pair(base: str | os.PathLike[str], tuned: str | os.PathLike[str]) -> Iterator[tuple[TensorSource, TensorSource]]:
    """Both models opened as tensor sources (headers only, no torch), closed on exit."""
    b = _open_model(base)
    try:
        t = _open_model(tuned)
    except BaseException:
        b.close()
        raise
    try:
        yield b, t
    finally:
        b.close()
        t.close()


def _open_model(path: str | os.PathLike[str]) -> TensorSource:
    src = open_source(path)
    if src.kind == "peft":
        src.close()
        raise LoraToolError("this is a LoRA adapter (peft), not a model to extract from", path)
    return src


def plan_extract(base: str | os.PathLike[str], tuned: str | os.PathLike[str], options: ExtractOptions,
                 advise: bool = False) -> Plan:
    """The plan alone (``--dry-run``, or to choose an output layout): modules, shapes and ranks from
    the headers; no tensor is read and torch is not needed. Pass it to ``ops.extract.extract`` so that
    planning happens once. ``advise``: the extraction follows, so tell the OS what it will read
    (:func:`advise_reads`)."""
    with open_pair(base, tuned) as (b, t):
        plan = build_plan(b, t, options)
        if advise:
            advise_reads(read_extents(b, t, plan.modules))
        return plan


HINT_CAP = 16 << 30  # bytes: at most this much is advised at once


def read_extents(base: TensorSource, tuned: TensorSource, modules: list[PlannedModule],
                 budget: int | None = None) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every byte range an extraction of ``modules`` reads, both models, in plan
    order, up to ``budget`` bytes (by default a quarter of the memory available now, at most ``HINT_CAP``:
    what the OS fetches ahead then stays cached until it is read); none for a pickle."""
    limit = min(HINT_CAP, available_memory() // 4) if budget is None else budget
    out, total = [], 0
    for m in modules:
        for src in (base, tuned):
            for seg, rows, _, n in weight_pieces(src, m.ref):
                where = src.extent(seg.key, rows)
                if where is None or not n:
                    continue
                if total + n > limit:
                    return out
                out.append(where)
                total += n
    return out


def advise_reads(extents: list[tuple[str, int, int]]) -> threading.Thread | None:
    """Tell the OS, on a thread of its own, that these byte ranges will be read soon (``posix_fadvise``
    ``WILLNEED``, in order): on a cold page cache the disk starts on them in the background while the
    command imports torch and starts the device (the calls themselves take ~0.2 s a GiB to queue, so they
    do not run on the planning thread); on a warm cache they cost a system call each. Nothing is read
    here and nothing waits; a file that cannot be opened is skipped (its read will say why). None where
    the OS takes no such hint."""
    if not extents or not hasattr(os, "posix_fadvise"):
        return None

    def run() -> None:
        fds: dict[str, int] = {}
        try:
            for path, offset, n in extents:
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never a FIFO's wait
                os.posix_fadvise(fds[path], offset, n, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            for fd in fds.values():
                os.close(fd)

    thread = threading.Thread(target=run, name="loratool-read-hint", daemon=True)
    thread.start()
    return thread


def available_memory() -> int:
    """Bytes of memory available for new data without swapping (MemAvailable on Linux, else free memory;
    0 when neither is known)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def detect_arch(src: TensorSource) -> str:
    """The family of a checkpoint from its key/shape table ("generic" when none fits)."""
    from loratool.arch import detect_arch_from_checkpoint

    name = detect_arch_from_checkpoint(src.shapes())
    return "generic" if name in (None, "unknown") else name


def build_plan(base: TensorSource, tuned: TensorSource, options: ExtractOptions) -> Plan:
    """The modules to extract, where each weight is in the files, and its rank; header facts only."""
    arch = options.arch or detect_arch(tuned)
    tied: dict[str, str] = {}
    if arch == "generic":
        modules, missing = _generic_modules(base, tuned, options), []
        modules, tied = _untie(modules, _model_config(tuned))
    else:
        modules, missing = _arch_modules(arch, tuned, options)
    keep, excluded = _filter(modules, options.include, options.exclude)
    for m in keep:
        _check_pair(base, tuned, m)
    if not keep:
        raise LoraToolError(f"nothing to extract: no {options.targets} module of {arch} was found in the inputs "
                            "or every one was excluded", tuned.path)
    return Plan(arch, keep, excluded, missing, tied, _model_config(tuned))


def _rank_for(shape: tuple[int, ...], options: ExtractOptions) -> int:
    is_kxk = len(shape) == 4 and math.prod(shape[2:]) > 1
    cap = options.conv_rank if (is_kxk and options.conv_rank) else options.rank
    return max(1, min(cap, shape[0], math.prod(shape[1:])))


def _generic_modules(base: TensorSource, tuned: TensorSource, options: ExtractOptions) -> list[PlannedModule]:
    only_base = sorted(set(base.keys()) - set(tuned.keys()))
    only_tuned = sorted(set(tuned.keys()) - set(base.keys()))
    if only_base or only_tuned:
        key, where = (only_base[0], tuned.path) if only_base else (only_tuned[0], base.path)
        extra = len(only_base) + len(only_tuned) - 1
        raise LoraToolError(f"tensor {key} is missing from this file"
                            + (f" ({extra} more keys differ)" if extra else "") + "; --arch generic needs "
                            "the same keys in BASE and TUNED", where)
    out = []
    for key in tuned.keys():
        shape = tuned.shape(key)
        if base.shape(key) != shape:  # checked before any is skipped: a 2-D weight stored 1-D is not "1-D"
            raise LoraToolError(f"tensor {key} has shape {list(base.shape(key))} in BASE but {list(shape)} "
                                "in TUNED", tuned.path)
        if len(shape) < 2 or tuned.dtype_name(key) not in FLOAT_NAMES or 0 in shape:
            continue
        path = key.removesuffix(".weight")
        ref = WeightRef((Segment(key),), shape)
        out.append(PlannedModule(GENERIC, path, shape, ref, _rank_for(shape, options),
                                 embedding=len(shape) == 2 and is_embedding(path)))
    return out


def _model_config(src: TensorSource) -> dict | None:
    """An HF model folder's config.json (not a pipeline's model_index.json)."""
    config = getattr(src, "config", None)
    return config if getattr(src, "kind", "") == "component" and isinstance(config, dict) else None


def _untie(modules: list[PlannedModule], config) -> tuple[list[PlannedModule], dict[str, str]]:
    """A head tied to the input embedding is that embedding: extracted once, as the embedding."""
    head = tied_head([m.path for m in modules], config)
    if head is None:
        return modules, {}
    embedding = next(m for m in modules if m.embedding)
    return [m for m in modules if m.path != head], {head: embedding.key}


def _arch_modules(name: str, src: TensorSource, options: ExtractOptions) -> tuple[list[PlannedModule], list[str]]:
    from loratool.arch import checkpoint_table

    arch = checkpoint_table(name, src.shapes())  # a family described by rules at the checkpoint's sizes
    keys = set(src.keys())
    out, missing = [], []
    for spec in arch.targets(options.targets, fused=True):
        ref = _locate(arch, spec, keys)
        if ref is None:
            missing.append(spec.key)
            continue
        out.append(PlannedModule(spec.component, spec.path, tuple(spec.shape), ref, _rank_for(spec.shape, options)))
    return out, missing


def _locate(arch, spec, keys: set[str]) -> WeightRef | None:
    """Where ``spec``'s weight is in a file with ``keys``: single-file, bare, diffusers or folder naming."""
    shape = tuple(spec.shape)
    diffusers = [spec.path + ".weight", f"{spec.component}.{spec.path}.weight"]
    for k in diffusers:
        if k in keys:
            return WeightRef((Segment(k),), shape)
    if spec.parts:  # a fused module in diffusers naming: its parts stacked
        for prefix in ("", f"{spec.component}."):
            names = [prefix + part.split(".", 1)[1] + ".weight" for part, _ in spec.parts]
            if all(n in keys for n in names):
                return WeightRef(tuple(Segment(n) for n in names), shape)
    if not spec.checkpoint_key:
        return None
    prefix = arch.checkpoint_prefix.get(spec.component, "")
    for ckey in (spec.checkpoint_key, spec.checkpoint_key.removeprefix(prefix)):
        if ckey in keys:
            return _checkpoint_ref(arch, spec, ckey, shape)
    return None


def _checkpoint_ref(arch, spec, ckey: str, shape: tuple[int, ...]) -> WeightRef:
    param = arch.params.get((spec.component, spec.path + ".weight"))
    transpose = bool(param and param.op == "T")
    if spec.row_order:
        return WeightRef(tuple(Segment(ckey, a, b) for a, b in spec.row_order), shape, transpose)
    if spec.checkpoint_rows:
        a, b = spec.checkpoint_rows
        return WeightRef((Segment(ckey, a, b),), shape, transpose)
    return WeightRef((Segment(ckey),), shape, transpose)


def _filter(modules: list[PlannedModule], include: tuple[str, ...], exclude: tuple[str, ...]):
    try:
        inc = [re.compile(p) for p in include]
        exc = [re.compile(p) for p in exclude]
    except re.error as e:
        raise LoraToolError(f"bad --include/--exclude regular expression: {e}") from None
    keep, dropped = [], []
    for m in modules:
        ok = (not inc or any(r.search(m.key) for r in inc)) and not any(r.search(m.key) for r in exc)
        (keep if ok else dropped).append(m)
    return keep, [m.key for m in dropped]


def _check_pair(base: TensorSource, tuned: TensorSource, m: PlannedModule) -> None:
    for seg in m.ref.segments:
        if seg.key not in base:
            raise LoraToolError(f"tensor {seg.key} (module {m.key}) is missing from BASE", base.path)
        if base.shape(seg.key) != tuned.shape(seg.key):
            raise LoraToolError(f"tensor {seg.key} has shape {list(base.shape(seg.key))} in BASE but "
                                f"{list(tuned.shape(seg.key))} in TUNED", tuned.path)
    rows = sum((s.stop if s.stop is not None else tuned.shape(s.key)[0]) - s.start for s in m.ref.segments)
    numel = rows * math.prod(tuned.shape(m.ref.segments[0].key)[1:])
    if numel != math.prod(m.shape):
        raise LoraToolError(f"tensor {m.ref.segments[0].key} does not have the shape the architecture table "
                            f"gives for {m.key} ({list(m.shape)})", tuned.path)
